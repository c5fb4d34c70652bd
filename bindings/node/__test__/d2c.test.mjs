// D2C end to end through an embedded hub: properties and system properties, send / sendMany
// outcomes, flush, stats and status.
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { DeviceClient } from '../index.js'
import { readIds, startHub, until } from './helpers.mjs'

let h
before(async () => {
  h = await startHub()
})
after(async () => {
  await h.stop()
})

test('a message with properties arrives with every field and the hub system properties', async () => {
  const [id, cs] = await h.device('props')
  const dev = await DeviceClient.fromConnectionString(cs, { outboxDir: h.outbox('props') })
  assert.equal(dev.deviceId, id)
  const expiry = new Date(Date.now() + 3_600_000)
  const d = await dev.send(Buffer.from('{"t":21.5}'), {
    properties: { unit: 'celsius', 'seq no': '7', empty: '' },
    messageId: 'm-props-1',
    correlationId: 'corr-9',
    contentType: 'application/json',
    contentEncoding: 'utf-8',
    expiry,
  })
  assert.equal(d.messageId, 'm-props-1')
  assert.equal(typeof d.sequenceNumber, 'number')
  assert.equal(await d.outcome(20_000), 'delivered')
  assert.equal(d.peek(), 'delivered')
  await dev.send('plain string body')
  const stream = await h.service.events('$Default', { from: 'earliest' })
  const got = await readIds(stream, 2)
  await stream.close()
  const ev = got.get('m-props-1')
  assert.ok(ev, `not received; got ${[...got.keys()]}`)
  assert.deepEqual(ev.body, Buffer.from('{"t":21.5}'))
  assert.deepEqual(ev.properties, { unit: 'celsius', 'seq no': '7', empty: '' })
  assert.equal(ev.correlationId, 'corr-9')
  assert.equal(ev.contentType, 'application/json')
  assert.equal(ev.contentEncoding, 'utf-8')
  assert.equal(ev.deviceId, id)
  assert.equal(ev.systemProperties['iothub-connection-device-id'], id)
  assert.ok(ev.expiryTime instanceof Date && Math.abs(ev.expiryTime.getTime() - expiry.getTime()) < 1000)
  assert.ok(ev.enqueuedTime instanceof Date && Math.abs(ev.enqueuedTime.getTime() - Date.now()) < 60_000)
  assert.equal(ev.enqueuedTimeMs, ev.enqueuedTime.getTime())
  assert.ok(ev.creationTime instanceof Date)
  assert.equal(typeof ev.partition, 'number')
  assert.ok([...got.values()].some((e) => e.body.toString() === 'plain string body'))
  await dev.close()
})

test('sendMany queues a batch in order, each with its own outcome; flush and stats agree', async () => {
  const [, cs] = await h.device('many')
  const dev = await DeviceClient.fromConnectionString(cs, { outboxDir: h.outbox('many') })
  const items = Array.from({ length: 300 }, (_, i) =>
    i % 3 === 0 ? `body-${i}` : { body: Buffer.from(`body-${i}`), messageId: `many-${i}`, properties: { i: String(i) } },
  )
  const ds = await dev.sendMany(items)
  assert.equal(ds.length, 300)
  assert.ok(ds.every((d, i) => i === 0 || d.sequenceNumber > ds[i - 1].sequenceNumber), 'sequence numbers not increasing')
  assert.equal(ds[1].messageId, 'many-1')
  await dev.flush(30_000)
  const outcomes = await Promise.all(ds.map((d) => d.outcome()))
  assert.ok(outcomes.every((o) => o === 'delivered'))
  const st = dev.stats()
  assert.equal(st.delivered, 300)
  assert.equal(st.depth, 0)
  assert.ok(st.connects >= 1)
  await dev.close()
})

test('onStatus reports connected, then closed; status and closed follow', async () => {
  const [, cs] = await h.device('status')
  const dev = await DeviceClient.fromConnectionString(cs, { inMemory: true })
  const seen = []
  dev.onStatus((s) => seen.push(s.status))
  assert.ok(await until(() => seen.includes('connected')), `statuses: ${seen}`)
  assert.equal(dev.status, 'connected')
  assert.equal(dev.closed, false)
  await dev.close()
  assert.equal(dev.closed, true)
  assert.ok(await until(() => seen.at(-1) === 'closed'), `statuses: ${seen}`)
})

test('an expired message is an outcome, not an error', async () => {
  const [, cs] = await h.device('expired')
  const dev = await DeviceClient.fromConnectionString(cs, { inMemory: true })
  const d = await dev.send('stale', { expiry: 0 })
  assert.equal(await d.outcome(20_000), 'expired')
  assert.equal(dev.stats().expired, 1)
  await dev.close()
})
