// Errors: the code table, every code raised by a real case, and bad input — wrong types, a body
// over the limit, a bad connection string, use after close — each a clear error, never a crash.
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { createServer } from 'node:net'
import { writeFileSync, mkdirSync } from 'node:fs'
import { join } from 'node:path'
import { DeviceClient, ServiceClient, Hub, errorCodes, setLogHandler } from '../index.js'
import { startHub } from './helpers.mjs'

const CODES = [
  'INVALID_ARGUMENT', 'UNAUTHORIZED', 'NOT_FOUND', 'ALREADY_EXISTS', 'QUEUE_FULL', 'MESSAGE_TOO_LARGE',
  'TIMEOUT', 'DISCONNECTED', 'STORAGE', 'PROTOCOL', 'CLOSED', 'EXPIRED', 'LOCK_LOST', 'USAGE', 'INTERNAL',
].map((c) => `HUBMSG_${c}`)

let h
before(async () => {
  h = await startHub()
})
after(async () => {
  await h.stop()
})

test('the codes are the engine kind table, in order, and index.d.ts lists the same', async () => {
  assert.deepEqual(errorCodes(), CODES)
  const { readFileSync } = await import('node:fs')
  const dts = readFileSync(new URL('../index.d.ts', import.meta.url), 'utf8')
  const declared = [...dts.matchAll(/\| '(HUBMSG_[A-Z_]+)'/g)].map((m) => m[1])
  assert.deepEqual(declared, CODES, 'HubmsgErrorCode in scripts/dts-header.d.ts is out of date')
})

/** A TCP server on 127.0.0.1 that answers each connection with `reply` (empty: close at once). */
async function fakeHub(reply) {
  const srv = createServer((c) => {
    c.once('data', () => (reply.length ? c.end(reply) : c.destroy()))
    c.on('error', () => {})
  })
  await new Promise((r) => srv.listen(0, '127.0.0.1', r))
  return { host: `127.0.0.1:${srv.address().port}`, close: () => new Promise((r) => srv.close(r)) }
}

const serviceAt = (host) =>
  ServiceClient.fromConnectionString(`HostName=${host};SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5a2V5a2V5`, {
    retry: { never: true },
    requestTimeoutMs: 10_000,
  })

test('every code that the API raises, from a real case', async () => {
  const raised = new Set()
  const expect = async (code, f) => {
    let err
    try {
      await f()
    } catch (e) {
      err = e
    }
    assert.ok(err, `${code}: nothing was thrown`)
    assert.ok(err instanceof Error)
    assert.equal(err.code, code, `${err.code}: ${err.message}`)
    assert.ok(err.message.length > 0 && !err.message.startsWith('HUBMSG_'), err.message)
    raised.add(code)
    return err
  }
  await expect('HUBMSG_INVALID_ARGUMENT', () => DeviceClient.fromConnectionString('HostName=x'))
  const badKey = h.hub.serviceConnectionString.replace(/SharedAccessKey=.*$/, 'SharedAccessKey=a2V5a2V5a2V5')
  const bad = await ServiceClient.fromConnectionString(badKey, { retry: { never: true } })
  await expect('HUBMSG_UNAUTHORIZED', () => bad.listDevices())
  await bad.close()
  await expect('HUBMSG_NOT_FOUND', () => h.service.getDevice('nobody'))
  await h.service.createDevice('twice')
  await expect('HUBMSG_ALREADY_EXISTS', () => h.service.createDevice('twice'))
  const down = 'HostName=127.0.0.1:1;DeviceId=d;SharedAccessKey=a2V5a2V5a2V5'
  const dev = await DeviceClient.fromConnectionString(down, { inMemory: true, maxMessages: 2, retry: { never: true } })
  await dev.send('1')
  await dev.send('2')
  const full = await expect('HUBMSG_QUEUE_FULL', () => dev.send('3'))
  assert.match(full.message, /2/)
  await expect('HUBMSG_MESSAGE_TOO_LARGE', () => dev.send(Buffer.alloc(256 * 1024 + 1)))
  await expect('HUBMSG_TIMEOUT', () => dev.flush(100))
  await dev.close()
  const [c2dId] = await h.device('c2dfull')
  for (let i = 0; i < 50; i++) await h.service.sendC2d(c2dId, `m${i}`)
  await expect('HUBMSG_QUEUE_FULL', () => h.service.sendC2d(c2dId, 'one too many'))
  const closing = await fakeHub(Buffer.alloc(0))
  const s1 = await serviceAt(closing.host)
  await expect('HUBMSG_DISCONNECTED', () => s1.listDevices())
  await s1.close()
  await closing.close()
  const garbage = await fakeHub(Buffer.from([0xff, 0x00, 0x67, 0x61, 0x72]))
  const s2 = await serviceAt(garbage.host)
  await expect('HUBMSG_PROTOCOL', () => s2.listDevices())
  await s2.close()
  await garbage.close()
  mkdirSync(h.root, { recursive: true })
  writeFileSync(join(h.root, 'file'), 'not a directory')
  await expect('HUBMSG_STORAGE', () => DeviceClient.fromConnectionString(down, { outboxDir: join(h.root, 'file', 'ob') }))
  const dev2 = await DeviceClient.fromConnectionString(down, { inMemory: true })
  await dev2.close()
  await expect('HUBMSG_CLOSED', () => dev2.send('late'))
  const [id, cs] = await h.device('usage')
  await h.service.sendC2d(id, 'once')
  const dev3 = await DeviceClient.fromConnectionString(cs, { inMemory: true })
  const msg = await dev3.receive(20_000)
  msg.complete()
  await expect('HUBMSG_USAGE', () => msg.complete())
  await dev3.close()
  // EXPIRED, LOCK_LOST and INTERNAL are never raised by the client API: an expired message is
  // an outcome ("expired"), a lost lock is the hub's business, INTERNAL is a bug.
  assert.deepEqual([...raised].sort(), CODES.filter((c) => !['HUBMSG_EXPIRED', 'HUBMSG_LOCK_LOST', 'HUBMSG_INTERNAL'].includes(c)).sort())
})

test('wrong types are TypeErrors with code HUBMSG_INVALID_ARGUMENT that name the call; nothing is queued', async () => {
  const [, cs] = await h.device('types')
  const dev = await DeviceClient.fromConnectionString(cs, { inMemory: true })
  const typeError = (re) => (e) => e instanceof TypeError && e.code === 'HUBMSG_INVALID_ARGUMENT' && re.test(e.message)
  assert.throws(() => dev.send(42), typeError(/DeviceClient\.send: body must be a Buffer, a Uint8Array or a string, not number/))
  assert.throws(() => dev.send(null), typeError(/not null/))
  assert.throws(() => dev.send('x', { properties: { n: 1 } }), typeError(/property 'n' must be a string, not number/))
  assert.throws(() => dev.send('x', { properties: ['a'] }), typeError(/properties must be an object/))
  assert.throws(() => dev.send('x', { messageID: 'typo' }), typeError(/no option 'messageID'/))
  assert.throws(() => dev.send('x', 'options'), typeError(/send options must be an object, not string/))
  assert.throws(() => dev.send('x', { expiry: 'soon' }), typeError(/expiry must be a Date or a time to live/))
  assert.throws(() => dev.send('x', { messageId: 5 }), typeError(/messageId/))
  assert.throws(() => dev.sendMany(['ok', 3]), typeError(/not number/))
  assert.throws(() => dev.sendMany([{ body: 'x', extra: 1 }]), typeError(/no field 'extra'/))
  assert.throws(() => dev.flush('soon'), typeError(/DeviceClient\.flush/))
  assert.throws(() => dev.onMessage('not a function'), typeError(/onMessage/))
  assert.throws(() => DeviceClient.fromConnectionString(cs, { outbox: 'x' }), typeError(/device options have no option 'outbox'/))
  assert.throws(() => DeviceClient.fromConnectionString(42), typeError(/fromConnectionString/))
  const invalid = (re) => (e) => e.code === 'HUBMSG_INVALID_ARGUMENT' && !(e instanceof TypeError) && re.test(e.message)
  assert.throws(() => dev.send('x', { expiry: NaN }), invalid(/finite/))
  assert.throws(() => dev.send('x', { messageId: '' }), invalid(/messageId is empty/))
  assert.throws(() => dev.receive(-1), invalid(/timeoutMs/))
  await assert.rejects(dev.send('x', { properties: { '': 'empty name' } }), invalid(/./))
  assert.equal(dev.stats().depth, 0, 'a refused send queued something')
  assert.equal(await (await dev.send('still works')).outcome(20_000), 'delivered')
  await dev.close()
  for (const bad of ['', 'nonsense', 'HostName=h;SharedAccessKeyName=p;SharedAccessKey=a2V5']) {
    assert.throws(() => DeviceClient.fromConnectionString(bad), invalid(/./), bad)
  }
  assert.throws(() => ServiceClient.fromConnectionString(cs), invalid(/device string|DeviceId|service/i))
  assert.throws(() => DeviceClient.fromConnectionString(cs, { outboxDir: 'x', inMemory: true }), invalid(/not both/))
  assert.throws(() => DeviceClient.fromConnectionString(cs, { overflow: 'sometimes' }), invalid(/overflow/))
  assert.throws(() => DeviceClient.fromConnectionString(cs, { durability: 'maybe' }), invalid(/durability/))
  assert.throws(() => DeviceClient.fromConnectionString(cs, { retry: { multiplier: 0.5 } }), invalid(/multiplier/))
  assert.throws(() => Hub.start(join(h.root, 'h2'), { listen: 'nowhere' }), invalid(/listen/))
  assert.throws(() => setLogHandler(() => {}, 'loud'), invalid(/log level/))
})

test('closed clients, streams and hubs say so; iteration of a closed stream ends', async () => {
  const [, cs] = await h.device('closed')
  const dev = await DeviceClient.fromConnectionString(cs, { inMemory: true })
  await dev.close()
  await dev.close() // idempotent
  for (const call of [() => dev.send('x'), () => dev.receive(100), () => dev.flush(1000), () => dev.messages()]) {
    await assert.rejects(async () => call(), (e) => e.code === 'HUBMSG_CLOSED' && /closed/.test(e.message))
  }
  const svc = await ServiceClient.fromConnectionString(h.hub.serviceConnectionString)
  await svc.close()
  await assert.rejects(async () => svc.listDevices(), (e) => e.code === 'HUBMSG_CLOSED')
  const svc2 = await ServiceClient.fromConnectionString(h.hub.serviceConnectionString)
  const stream = await svc2.events('$Default')
  await stream.close()
  assert.equal(await stream.next(1000), null)
  const items = []
  for await (const ev of stream) items.push(ev)
  assert.deepEqual(items, [])
  await assert.rejects(async () => stream.checkpoint(), (e) => e.code === 'HUBMSG_CLOSED')
  await svc2.close()
  const hub = await Hub.start(join(h.root, 'h3'))
  await hub.shutdown()
  assert.equal(hub.running, false)
  await assert.rejects(async () => hub.createDevice('x'), (e) => e.code === 'HUBMSG_CLOSED')
})
