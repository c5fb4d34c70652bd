// C2D: complete / abandon / reject each with its feedback, by pull, by async iterator and by
// the onMessage callback; feedback batches; purge.
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { DeviceClient } from '../index.js'
import { startHub, until } from './helpers.mjs'

let h
before(async () => {
  h = await startHub()
})
after(async () => {
  await h.stop()
})

test('complete, reject and abandon (to the delivery limit) give Success, Rejected, DeliveryCountExceeded', async () => {
  const [id, cs] = await h.device('settle')
  const dev = await DeviceClient.fromConnectionString(cs, { inMemory: true })
  const device = (async () => {
    let abandons = 0
    for await (const msg of dev.messages()) {
      const what = msg.body.toString()
      if (what === 'do') msg.complete()
      else if (what === 'refuse') msg.reject()
      else {
        msg.abandon()
        abandons++
      }
      assert.equal(msg.settled, true)
      assert.throws(() => msg.complete(), (e) => e.code === 'HUBMSG_USAGE' && /already settled/.test(e.message))
    }
    return abandons
  })()
  const [ok, refused, dead] = await Promise.all([
    h.service.sendC2dAndWait(id, 'do', { properties: { op: 'open' }, timeoutMs: 30_000 }),
    h.service.sendC2dAndWait(id, 'refuse', { timeoutMs: 30_000 }),
    h.service.sendC2dAndWait(id, 'never', { timeoutMs: 30_000 }),
  ])
  assert.equal(ok.status, 'Success')
  assert.equal(ok.deviceId, id)
  assert.equal(refused.status, 'Rejected')
  assert.equal(dead.status, 'DeliveryCountExceeded')
  await dev.close()
  assert.equal(await device, 10, 'the abandoned message was not delivered 10 times') // the iteration ended at close
})

test('receive(timeout) returns null on timeout, then the message with its properties', async () => {
  const [id, cs] = await h.device('recv')
  const dev = await DeviceClient.fromConnectionString(cs, { inMemory: true })
  assert.equal(await dev.receive(200), null)
  const r = await h.service.sendC2d(id, Buffer.from([1, 2, 3]), { messageId: 'c-1', correlationId: 'k', properties: { a: 'b' }, ack: 'full', ttlMs: 60_000 })
  assert.equal(r.messageId, 'c-1')
  assert.equal(typeof r.sequenceNumber, 'number')
  const m = await dev.receive(20_000)
  assert.ok(m)
  assert.deepEqual(m.body, Buffer.from([1, 2, 3]))
  assert.equal(m.messageId, 'c-1')
  assert.equal(m.correlationId, 'k')
  assert.deepEqual(m.properties, { a: 'b' })
  assert.equal(m.sequenceNumber, r.sequenceNumber)
  assert.equal(m.systemProperties['iothub-ack'], 'full')
  // The feedback stream is opened before the settle: a batch that arrives while no stream is
  // open waits at the hub until one is (or until another reader takes it).
  const fb = h.service.feedback()
  m.complete()
  let record
  for await (const batch of fb) {
    record = batch.records.find((x) => x.originalMessageId === 'c-1')
    batch.ack()
    if (record) break
  }
  assert.equal(record.status, 'Success')
  await dev.close()
})

test('onMessage pushes every message to the handler, which settles it', async () => {
  const [id, cs] = await h.device('push')
  const dev = await DeviceClient.fromConnectionString(cs, { inMemory: true })
  const seen = []
  dev.onMessage((m) => {
    seen.push(m.messageId)
    m.complete()
  })
  for (let i = 0; i < 5; i++) await h.service.sendC2d(id, `cmd ${i}`, { messageId: `p-${i}` })
  assert.ok(await until(() => seen.length === 5, 20_000), `handled ${seen}`)
  assert.deepEqual(seen, ['p-0', 'p-1', 'p-2', 'p-3', 'p-4'])
  await assert.rejects(dev.receive(10), (e) => e.code === 'HUBMSG_USAGE' && /callback/.test(e.message))
  await dev.close()
})

test('purge removes pending commands, with feedback Purged', async () => {
  const [id] = await h.device('purge')
  for (let i = 0; i < 49; i++) await h.service.sendC2d(id, `x${i}`)
  const waited = h.service.sendC2dAndWait(id, 'last', { messageId: 'purged-last', timeoutMs: 30_000 })
  let purged = 0
  assert.ok(await until(async () => (purged += await h.service.purgeC2d(id)) === 50), `purged ${purged}`)
  assert.equal((await waited).status, 'Purged')
})
