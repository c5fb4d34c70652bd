'use strict'
// What the JS side adds to the native classes (installed once, by index.js):
//
// 1. Error codes. A native method rejects or throws with a message that starts with the code of
//    the engine's error kind ("HUBMSG_QUEUE_FULL: ..."), because napi-rs can only give an async
//    error the code of a napi status. Every method (and getter) of every class, and every
//    function, is wrapped so that its errors get `err.code` from that prefix (the message keeps
//    the rest). Errors of the wrong JS type (napi status InvalidArg / *Expected, or the native
//    side's own type checks) become TypeErrors with code HUBMSG_INVALID_ARGUMENT, prefixed with
//    the method's name.
// 2. `[Symbol.asyncIterator]` on C2dStream, EventStream and FeedbackStream; the iteration ends
//    when the stream (or its client) is closed, and `break` leaves the stream open. On
//    C2dStream and EventStream an iteration reads with the native `nextBatch(ITER_BATCH)`: one
//    Promise for up to ITER_BATCH items that had already arrived (nothing is read ahead of the
//    pump, so a slow `for await` body still holds back delivery at the hub's window), handed
//    out one by one from a queue of the stream's own. The queue belongs to the stream, not to
//    the iteration: items an iteration did not hand out before a `break` are the next ones
//    `next()`, `nextBatch()` or another iteration return, and `buffered` counts them. FeedbackStream
//    iterates with `next()`, one batch at a time.
// 3. HUBMSG_LOG=<level> (or DEBUG containing "hubmsg", = debug): engine logs to stderr.

const PREFIX = /^(HUBMSG_[A-Z_]+): /
const TYPE_STATUSES = new Set([
  'InvalidArg', 'ObjectExpected', 'StringExpected', 'NameExpected', 'FunctionExpected', 'NumberExpected',
  'BooleanExpected', 'ArrayExpected', 'BigintExpected', 'DateExpected', 'ArrayBufferExpected',
])
const FIXED = Symbol('hubmsg.fixed')

/** Gives a native error its `code` (see above); `where` names the call. */
function fixError(err, where) {
  if (!(err instanceof Error) || err[FIXED]) return err
  const m = PREFIX.exec(err.message)
  const isType = TYPE_STATUSES.has(err.code)
  let message = m ? err.message.slice(m[0].length) : err.message
  if (isType || !m) message = `${where}: ${message}`
  const code = m ? m[1] : isType ? 'HUBMSG_INVALID_ARGUMENT' : 'HUBMSG_INTERNAL'
  let e = err
  if (isType) {
    e = new TypeError(message)
    Error.captureStackTrace(e, fixError)
  } else {
    if (typeof e.stack === 'string') e.stack = e.stack.replace(err.message, message)
    e.message = message
  }
  Object.defineProperty(e, 'code', { value: code, enumerable: true, writable: true, configurable: true })
  Object.defineProperty(e, FIXED, { value: true })
  return e
}

function wrap(fn, where) {
  const wrapped = {
    [fn.name || 'call'](...args) {
      let r
      try {
        r = fn.apply(this, args)
      } catch (e) {
        throw fixError(e, where)
      }
      if (r !== null && typeof r === 'object' && typeof r.then === 'function') {
        return r.then(undefined, (e) => {
          throw fixError(e, where)
        })
      }
      return r
    },
  }[fn.name || 'call']
  return wrapped
}

function wrapMembers(target, prefix) {
  for (const key of Object.getOwnPropertyNames(target)) {
    if (['constructor', 'prototype', 'length', 'name', 'arguments', 'caller'].includes(key)) continue
    const d = Object.getOwnPropertyDescriptor(target, key)
    if (!d || (typeof d.value !== 'function' && !d.get)) continue
    if (!d.configurable) throw new Error(`hubmsg: ${prefix}${key} is not configurable; its errors would get no code`)
    const where = `${prefix}${key}`
    if (typeof d.value === 'function') d.value = wrap(d.value, where)
    else if (d.get) d.get = wrap(d.get, where)
    else continue
    Object.defineProperty(target, key, d)
  }
}

function addAsyncIterator(cls) {
  if (!cls) return
  cls.prototype[Symbol.asyncIterator] = function () {
    const stream = this
    return {
      async next() {
        const value = await stream.next()
        return value === null ? { done: true, value: undefined } : { done: false, value }
      },
      async return() {
        return { done: true, value: undefined }
      },
      [Symbol.asyncIterator]() {
        return this
      },
    }
  }
}

/** Items one native call of an iteration takes at most (see 2. above). */
const ITER_BATCH = 500
const QUEUE = Symbol('hubmsg.queue')

/**
 * The batched reading of a stream class with native `next`, `nextBatch`, `buffered`, `closed`.
 * `ownClose`: the stream is closed only by its own `close()` (EventStream), which then drops the
 * queue; otherwise (C2dStream, closed with its client) `closed` is asked before handing out a
 * queued item.
 */
function addBatchedReading(cls, ownClose) {
  if (!cls) return
  const proto = cls.prototype
  const nativeNext = proto.next
  const nativeBatch = proto.nextBatch
  const buffered = Object.getOwnPropertyDescriptor(proto, 'buffered')
  // Items taken from the native side and not handed out yet; empty once the stream is closed.
  const queue = (stream) => {
    let q = stream[QUEUE]
    if (!q) {
      q = { items: [], head: 0 }
      Object.defineProperty(stream, QUEUE, { value: q })
    }
    if (!ownClose && q.head < q.items.length && stream.closed) {
      q.items = []
      q.head = 0
    }
    return q
  }
  const waiting = (q) => q.items.length - q.head
  const takeOne = (q) => {
    const v = q.items[q.head]
    q.items[q.head++] = undefined
    if (q.head === q.items.length) {
      q.items = []
      q.head = 0
    }
    return v
  }
  const take = (q, max) => {
    const out = q.items.slice(q.head, q.head + max)
    q.head += out.length
    if (q.head === q.items.length) {
      q.items = []
      q.head = 0
    }
    return out
  }
  Object.defineProperty(proto, 'next', {
    ...Object.getOwnPropertyDescriptor(proto, 'next'),
    value: function next(...args) {
      const q = queue(this)
      return waiting(q) ? Promise.resolve(takeOne(q)) : nativeNext.apply(this, args)
    },
  })
  Object.defineProperty(proto, 'nextBatch', {
    ...Object.getOwnPropertyDescriptor(proto, 'nextBatch'),
    value: function nextBatch(max, timeoutMs) {
      const q = queue(this)
      if (!waiting(q)) return nativeBatch.call(this, max, timeoutMs)
      if (max !== undefined && !(Number.isInteger(max) && max >= 1 && max <= 10_000)) return nativeBatch.call(this, max, timeoutMs) // its error
      return Promise.resolve(take(q, max ?? 100))
    },
  })
  if (ownClose) {
    const nativeClose = proto.close
    Object.defineProperty(proto, 'close', {
      ...Object.getOwnPropertyDescriptor(proto, 'close'),
      value: function close(...args) {
        const q = queue(this)
        q.items = []
        q.head = 0
        return nativeClose.apply(this, args)
      },
    })
  }
  Object.defineProperty(proto, 'buffered', {
    ...buffered,
    get() {
      return buffered.get.call(this) + waiting(queue(this))
    },
  })
  proto[Symbol.asyncIterator] = function () {
    const stream = this
    return {
      async next() {
        const q = queue(stream)
        if (!waiting(q)) {
          const batch = await nativeBatch.call(stream, ITER_BATCH)
          if (batch === null) return { done: true, value: undefined }
          q.items = batch
          q.head = 0
          if (!batch.length) return this.next()
        }
        return { done: false, value: takeOne(q) }
      },
      async return() {
        return { done: true, value: undefined }
      },
      [Symbol.asyncIterator]() {
        return this
      },
    }
  }
}

const LEVELS = ['off', 'error', 'warn', 'info', 'debug', 'trace']

function installLogSwitch(native) {
  let level = process.env.HUBMSG_LOG
  if (!level && /(^|,)\s*hubmsg(\*|:\*)?\s*(,|$)/.test(process.env.DEBUG || '')) level = 'debug'
  if (!level) return
  level = level.trim().toLowerCase()
  if (!LEVELS.includes(level)) {
    process.emitWarning(`HUBMSG_LOG='${process.env.HUBMSG_LOG}' is not one of ${LEVELS.join(', ')}; engine logs stay off`)
    return
  }
  native.setLogHandler((lvl, target, message) => {
    process.stderr.write(`${new Date().toISOString()} hubmsg ${lvl.toUpperCase()} ${target}: ${message}\n`)
  }, level)
}

let installed = false

/** Installs the JS layer on the exports of native.js (once). */
function install(native) {
  if (installed) return
  installed = true
  for (const [name, value] of Object.entries(native)) {
    if (typeof value !== 'function') continue
    if (value.prototype && Object.getOwnPropertyNames(value.prototype).length > 1) {
      wrapMembers(value.prototype, `${name}.`)
      wrapMembers(value, `${name}.`)
    } else {
      native[name] = wrap(value, name)
    }
  }
  addAsyncIterator(native.FeedbackStream)
  addBatchedReading(native.C2dStream, false)
  addBatchedReading(native.EventStream, true)
  installLogSwitch(native)
}

module.exports = { install, fixError }
