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
// 2. `[Symbol.asyncIterator]` on C2dStream, EventStream and FeedbackStream: each step awaits
//    the native `next()` (one item at a time: nothing is read ahead, so a slow `for await` body
//    holds back delivery); the iteration ends when `next()` resolves to null (the stream or its
//    client was closed). `break` leaves the stream open.
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
  for (const name of ['C2dStream', 'EventStream', 'FeedbackStream']) addAsyncIterator(native[name])
  installLogSwitch(native)
}

module.exports = { install, fixError }
