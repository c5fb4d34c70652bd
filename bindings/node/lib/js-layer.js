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
// 4. `DeviceClient.sendMany` packs a batch whose items are all plain — a body (Buffer,
//    Uint8Array, string) or a plain object with only `body` and `messageId` (a string, null or
//    absent) — into one Buffer of the bodies back to back, their byte lengths and their ids, and
//    gives that to the native `_sendManyPacked`: the same messages and checks, without the native
//    side reading each item's properties through napi (which cost more than the engine's own
//    work per message). Any other batch goes as it is to the native `sendMany`, which checks
//    every item and gives the errors. Either resolves to one native value for the whole batch;
//    the Delivery objects handed out for it are JS objects (`instanceof Delivery`) whose members
//    call the native `_delivery*` functions with the batch and their index — a native object per
//    message cost more than sending it.
// 5. The same for `EventStream.nextBatch` (and so for `for await` over an EventStream): the
//    native side resolves to one value for the batch; each Event handed out reads `messageId`
//    from the batch's id column (one napi call per batch), its `ack()`s of one tick go as one
//    call when the tick ends (setImmediate; `checkpoint()` and `close()` make it first), and it
//    makes a native Event for any other member on first use. Events from `next()` are native.
// 6. `DeviceClient.send` of a plain message (a body as in 4., options absent or with only a
//    non-empty `messageId`) joins the other plain sends of the same tick: when the microtasks
//    run they go as one packed batch (one napi call, one fsync wait), each Promise resolving to
//    its own Delivery. A batch the outbox refuses whole (QUEUE_FULL, MESSAGE_TOO_LARGE: nothing
//    of it was queued) is sent again message by message, in order, so each send gets the result
//    it would have had alone. `flush()`, `sendMany()` and `close()` first hand over the sends
//    still waiting for their tick. Any other send goes to the native `send` at once.

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

/** Replaces method `name` of `proto` by `value`, keeping its property attributes. */
function replaceMethod(proto, name, value) {
  Object.defineProperty(proto, name, { ...Object.getOwnPropertyDescriptor(proto, name), value })
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
function addBatchedReading(cls, ownClose, expand) {
  if (!cls) return
  const proto = cls.prototype
  const nativeNext = proto.next
  const batchOf = proto.nextBatch
  const nativeBatch = expand ? function (...args) { return batchOf.apply(this, args).then((b) => (b === null ? null : expand(b))) } : batchOf
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
  replaceMethod(proto, 'next', function next(...args) {
    const q = queue(this)
    return waiting(q) ? Promise.resolve(takeOne(q)) : nativeNext.apply(this, args)
  })
  replaceMethod(proto, 'nextBatch', function nextBatch(max, timeoutMs) {
    const q = queue(this)
    if (!waiting(q)) return nativeBatch.call(this, max, timeoutMs)
    if (max !== undefined && !(Number.isInteger(max) && max >= 1 && max <= 10_000)) return nativeBatch.call(this, max, timeoutMs) // its error
    return Promise.resolve(take(q, max ?? 100))
  })
  if (ownClose) {
    const nativeClose = proto.close
    replaceMethod(proto, 'close', function close(...args) {
      const q = queue(this)
      q.items = []
      q.head = 0
      return nativeClose.apply(this, args)
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

/**
 * A `sendMany` batch packed for `_sendManyPacked` (see 4. above), or null when an item is not
 * plain (then the native `sendMany` takes the batch and checks it).
 */
function pack(messages) {
  const n = messages.length
  const parts = new Array(n)
  const lengths = new Uint32Array(n)
  const ids = new Array(n)
  let total = 0
  for (let k = 0; k < n; k++) {
    let body = messages[k]
    let id = null
    if (body !== null && typeof body === 'object' && !ArrayBuffer.isView(body)) {
      if (Object.getPrototypeOf(body) !== Object.prototype) return null
      for (const key in body) if (key !== 'body' && key !== 'messageId') return null
      id = body.messageId ?? null
      if (id !== null && typeof id !== 'string') return null
      body = body.body
    }
    if (typeof body === 'string') body = Buffer.from(body)
    else if (!(body instanceof Uint8Array)) return null
    parts[k] = body
    lengths[k] = body.length
    ids[k] = id
    total += body.length
  }
  // A batch of no bytes (no items, or empty bodies only) goes the general way: an empty Buffer
  // may have no memory to hand over.
  return total ? { bodies: Buffer.concat(parts, total), lengths, ids } : null
}

const BATCH = Symbol('hubmsg.batch')
const INDEX = Symbol('hubmsg.index')
const NATIVE = Symbol('hubmsg.native')

// Holders of batches with `Many` calls (acks) waiting for the end of their tick.
const deferred = new Set()
let deferredScheduled = false

/** Makes the `Many` calls waiting for the end of their tick (also before a checkpoint or close). */
function flushDeferred() {
  deferredScheduled = false
  for (const h of deferred) {
    for (const [call, indices] of h.waiting) call(h.b, Uint32Array.from(indices))
    h.waiting.clear()
  }
  deferred.clear()
}

/**
 * The function that turns a native batch value (of `sendMany`, of `EventStream.nextBatch`) into
 * JS objects that are `instanceof` the native class `name` (see 4. and 5. above). For a member
 * `key` (`_<prefix><Key>` named after it):
 * - a getter with `_<prefix><Key>Column(batch)` reads its value from that array, fetched once per
 *   batch;
 * - a method with `_<prefix><Key>Many(batch, indices)` records the call, and the calls of one
 *   tick go as one (`flushDeferred`; a method taking arguments cannot be deferred);
 * - else `_<prefix><Key>(batch, index, ...args)` is called;
 * - else the member is read from a native instance made on first use by `_<prefix>At(batch,
 *   index)` — or, without that function, is an error at install (a member added to the class
 *   must get its function).
 */
function batchView(native, name, prefix) {
  const cls = native[name]
  const fn = (member, suffix = '') => {
    const f = native[`_${prefix}${member[0].toUpperCase()}${member.slice(1)}${suffix}`]
    return f && wrap(f, `${name}.${member}`)
  }
  const at = fn('at')
  const made = (o) => (o[NATIVE] ??= at(o[BATCH].b, o[INDEX]))
  const proto = Object.create(cls.prototype)
  for (const key of Object.getOwnPropertyNames(cls.prototype)) {
    if (key === 'constructor') continue
    const d = Object.getOwnPropertyDescriptor(cls.prototype, key)
    const [own, column, many] = [fn(key), fn(key, 'Column'), fn(key, 'Many')]
    if (!own && !column && !many && !at) throw new Error(`hubmsg: ${name}.${key} has no batch function`)
    let desc
    if (d.get) {
      const get = column
        ? function () {
          const h = this[BATCH]
          return ((h.columns ??= new Map()).get(key) ?? h.columns.set(key, column(h.b)).get(key))[this[INDEX]]
        }
        : own ? function () { return own(this[BATCH].b, this[INDEX]) } : function () { return made(this)[key] }
      desc = { get, enumerable: d.enumerable, configurable: true }
    } else {
      const value = many
        ? function () {
          const h = this[BATCH]
          const indices = h.waiting.get(many) ?? h.waiting.set(many, []).get(many)
          indices.push(this[INDEX])
          deferred.add(h)
          if (!deferredScheduled) {
            deferredScheduled = true
            setImmediate(flushDeferred)
          }
        }
        : own ? function (...args) { return own(this[BATCH].b, this[INDEX], ...args) } : function (...args) { return made(this)[key](...args) }
      desc = { value, writable: true, configurable: true }
    }
    Object.defineProperty(proto, key, desc)
  }
  const length = fn('length')
  return (batch) => {
    const n = length(batch)
    const h = { b: batch, columns: null, waiting: new Map() }
    const out = new Array(n)
    for (let i = 0; i < n; i++) {
      const o = Object.create(proto)
      o[BATCH] = h
      o[INDEX] = i
      out[i] = o
    }
    return out
  }
}

function addPackedSendMany(cls, deliveries) {
  const proto = cls.prototype
  const general = proto.sendMany
  const packed = proto._sendManyPacked
  replaceMethod(proto, 'sendMany', function sendMany(messages) {
    const p = Array.isArray(messages) ? pack(messages) : null
    return (p ? packed.call(this, p.bodies, p.lengths, p.ids) : general.call(this, messages)).then(deliveries)
  })
}

const WAITING = Symbol('hubmsg.waitingSends')

/** Whether `send(body, options)` may join a packed batch (see 6. above). */
function plainSend(body, options) {
  if (typeof body !== 'string' && !(body instanceof Uint8Array)) return false
  if (options === undefined) return true
  if (options === null || typeof options !== 'object' || Object.getPrototypeOf(options) !== Object.prototype) return false
  for (const key in options) if (key !== 'messageId') return false
  const id = options.messageId
  return id === undefined || (typeof id === 'string' && id !== '')
}

function addCoalescedSend(cls, deliveries) {
  const proto = cls.prototype
  const single = proto.send
  const packed = proto._sendManyPacked
  // Hands the sends waiting for their tick to the native side: a close() or flush() right
  // after it is ordered after them exactly as after as many native sends.
  const handOver = (client) => {
    const sends = client[WAITING]
    if (!sends) return
    client[WAITING] = null
    // Each alone, in order: a batch refused whole, or one of empty bodies only (not packed).
    const oneByOne = async () => {
      for (const x of sends) {
        try {
          x.resolve(await single.call(client, x.body, x.options))
        } catch (err) {
          x.reject(err)
        }
      }
    }
    const p = pack(sends.map((x) => (x.options?.messageId === undefined ? x.body : { body: x.body, messageId: x.options.messageId })))
    if (!p) return void oneByOne()
    let batch
    try {
      batch = packed.call(client, p.bodies, p.lengths, p.ids)
    } catch (e) {
      batch = Promise.reject(e)
    }
    batch.then(deliveries).then(
      (ds) => sends.forEach((x, i) => x.resolve(ds[i])),
      (e) => {
        if (sends.length > 1 && (e.code === 'HUBMSG_QUEUE_FULL' || e.code === 'HUBMSG_MESSAGE_TOO_LARGE')) return oneByOne()
        for (const x of sends) x.reject(e)
      },
    )
  }
  replaceMethod(proto, 'send', function send(body, options) {
    if (!plainSend(body, options)) {
      handOver(this)
      return single.call(this, body, options)
    }
    let sends = this[WAITING]
    if (!sends) {
      sends = this[WAITING] = []
      queueMicrotask(() => handOver(this))
    }
    return new Promise((resolve, reject) => sends.push({ body, options, resolve, reject }))
  })
  for (const name of ['flush', 'sendMany', 'close']) {
    const native = proto[name]
    replaceMethod(proto, name, function (...args) {
      handOver(this)
      return native.apply(this, args)
    })
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
  const deliveries = batchView(native, 'Delivery', 'delivery')
  const events = batchView(native, 'Event', 'event')
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
  addBatchedReading(native.EventStream, true, events)
  addPackedSendMany(native.DeviceClient, deliveries)
  addCoalescedSend(native.DeviceClient, deliveries)
  for (const name of ['checkpoint', 'close']) {
    const proto = native.EventStream.prototype
    const call = proto[name]
    replaceMethod(proto, name, function (...args) {
      flushDeferred()
      return call.apply(this, args)
    })
  }
  installLogSwitch(native)
}

module.exports = { install, fixError }
