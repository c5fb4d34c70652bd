// The objects a batch hands out (lib/js-layer.js, 4. to 6.): `sendMany` resolves to JS
// Delivery objects over one native batch, packed or not; `nextBatch` and `for await` hand out
// JS Event objects over one native batch; plain `send()`s of one tick go as one packed batch.
// Each must be what the native class (or a native send) gives: the same values for every
// member, `instanceof` the class, ack and outcome working, the same errors.
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { Delivery, DeviceClient, Event } from '../index.js'
import { startHub } from './helpers.mjs'

let h
before(async () => {
  h = await startHub({ partitions: 1 })
})
after(async () => {
  await h.stop()
})

/** The values of every getter of `cls` read from `o` (methods left out). */
function getters(cls, o) {
  const out = {}
  for (const key of Object.getOwnPropertyNames(cls.prototype)) {
    if (Object.getOwnPropertyDescriptor(cls.prototype, key).get) out[key] = o[key]
  }
  return out
}

test('sendMany gives the same messages and deliveries packed (plain items) and not (other fields)', async () => {
  const [, cs] = await h.device('views-send')
  const dev = await DeviceClient.fromConnectionString(cs, { outboxDir: h.outbox('views-send') })
  // Plain: bodies of every accepted kind, ids given, null, left out — packed into one buffer.
  const plain = await dev.sendMany([
    Buffer.from('p0'),
    'p1 \u00e9\u{1F600}',
    new Uint8Array([112, 50]),
    { body: 'p3', messageId: 'plain-3' },
    { body: Buffer.from('p4'), messageId: null },
    { body: '' },
    { messageId: 'plain-6', body: Buffer.alloc(0) },
  ])
  // Not plain (properties): checked item by item by the native side.
  const other = await dev.sendMany([{ body: 'o0', messageId: 'other-0', properties: { k: 'v' } }, 'o1'])
  assert.equal(plain.length, 7)
  assert.equal(other.length, 2)
  for (const d of [...plain, ...other]) {
    assert.ok(d instanceof Delivery, 'not a Delivery')
    assert.equal(typeof d.messageId, 'string')
    assert.ok(d.messageId.length > 0)
  }
  assert.equal(plain[3].messageId, 'plain-3')
  assert.equal(plain[6].messageId, 'plain-6')
  assert.equal(other[0].messageId, 'other-0')
  const seqs = [...plain, ...other].map((d) => d.sequenceNumber)
  assert.ok(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), `sequence numbers ${seqs}`)
  for (const d of [...plain, ...other]) assert.equal(await d.outcome(20_000), 'delivered')
  assert.equal(plain[0].peek(), 'delivered')
  await assert.rejects(async () => plain[0].outcome('soon'), (e) => e.code === 'HUBMSG_INVALID_ARGUMENT' && /Delivery\.outcome/.test(e.message))
  // What arrived: every body byte for byte, ids as given.
  const s = await h.service.events('views-send', { from: 'earliest' })
  const got = []
  for await (const ev of s) {
    got.push(ev)
    ev.ack()
    if (got.length === 9) break
  }
  await s.close()
  const bodies = got.map((e) => e.body.toString())
  assert.deepEqual(bodies, ['p0', 'p1 \u00e9\u{1F600}', 'p2', 'p3', 'p4', '', '', 'o0', 'o1'])
  assert.deepEqual(got.map((e) => e.messageId), [...plain, ...other].map((d) => d.messageId))
  assert.deepEqual(got[7].properties, { k: 'v' })
  // A bad item anywhere sends nothing, whichever path the rest would take.
  await assert.rejects(async () => dev.sendMany([{ body: 'a' }, { body: 7 }]), (e) => e instanceof TypeError)
  await assert.rejects(async () => dev.sendMany([{ body: 'a', messageId: 5 }]), (e) => e instanceof TypeError)
  assert.equal(dev.stats().depth, 0, "a refused batch left messages in the outbox")
  await dev.close()
})

test('events from nextBatch and for await are Events with every member of the native one, and ack() holds', async () => {
  const [id, cs] = await h.device('views-events')
  const dev = await DeviceClient.fromConnectionString(cs, { inMemory: true })
  const expiry = new Date(Date.now() + 3_600_000)
  await dev.sendMany(Array.from({ length: 6 }, (_, i) => ({
    body: `e${i}`, messageId: `ev-${i}`, properties: { i: String(i) }, correlationId: `c${i}`, contentType: 'text/plain', expiry,
  })))
  await dev.flush(20_000)
  await dev.close()
  // The same events read one by one (native Events) in a group of their own, and in batches.
  const one = await h.service.events('views-native', { from: 'earliest' })
  const natives = []
  while (natives.length < 6) {
    const ev = await one.next(20_000)
    assert.ok(ev, 'no event')
    if (ev.deviceId === id) natives.push(ev)
  }
  await one.close()
  const batched = await h.service.events('views-batched', { from: 'earliest' })
  const b = []
  for (let pulls = 0; b.length < 6 && pulls < 100; pulls++) {
    const got = await batched.nextBatch(100, 20_000)
    assert.ok(got, 'the stream ended')
    for (const ev of got) {
      if (ev.deviceId === id) b.push(ev)
      else ev.ack()
    }
  }
  assert.equal(b.length, 6)
  for (const [k, ev] of b.entries()) {
    assert.ok(ev instanceof Event, 'not an Event')
    assert.deepEqual(getters(Event, ev), getters(Event, natives[k]), `event ${k}`)
    assert.deepEqual(ev.properties, { i: String(k) })
  }
  // Acked in the batch: a checkpoint, and a reader of the group after it starts past them.
  for (const ev of b) ev.ack()
  await batched.checkpoint()
  await batched.close()
  const again = await h.service.events('views-batched') // from the checkpoint (an explicit position would move it)
  const came = await again.next(500)
  assert.equal(came, null, `an acknowledged event came again: ${came?.messageId} (#${came?.sequenceNumber}, device ${came?.deviceId})`)
  await again.close()
})

test('plain send()s of one tick go as one batch: every Promise its own Delivery, the same errors as alone', async () => {
  const [, cs] = await h.device('views-coalesce')
  const dev = await DeviceClient.fromConnectionString(cs, { outboxDir: h.outbox('views-coalesce') })
  // 200 plain sends and, in the same tick, ones that go to the native send (other options).
  const plain = Array.from({ length: 200 }, (_, i) => dev.send(`c${i}`, { messageId: `co-${i}` }))
  const other = dev.send('with props', { messageId: 'co-props', properties: { k: 'v' } })
  const bare = dev.send(Buffer.from('bare'))
  const ds = await Promise.all([...plain, other, bare])
  for (const d of ds) assert.ok(d instanceof Delivery, 'not a Delivery')
  assert.deepEqual(ds.slice(0, 200).map((d) => d.messageId), Array.from({ length: 200 }, (_, i) => `co-${i}`))
  const seqs = ds.slice(0, 200).map((d) => d.sequenceNumber)
  assert.ok(seqs.every((q, i) => i === 0 || q === seqs[i - 1] + 1), 'one tick of plain sends is not one batch in order')
  for (const d of ds) assert.equal(await d.outcome(20_000), 'delivered')
  // A send not awaited is still covered by a flush() right after it.
  const late = dev.send('late', { messageId: 'co-late' })
  await dev.flush(20_000)
  assert.equal((await late).peek(), 'delivered')
  await dev.close()

  // Near the bound: the batch of 5 does not fit in 3 free places, so each goes alone, in
  // order — 3 accepted, 2 refused — as 5 native sends would be.
  const down = 'HostName=127.0.0.1:1;DeviceId=d;SharedAccessKey=a2V5a2V5a2V5'
  const off = await DeviceClient.fromConnectionString(down, { inMemory: true, maxMessages: 4, retry: { never: true } })
  await off.send('0')
  const results = await Promise.allSettled(Array.from({ length: 5 }, (_, i) => off.send(`q${i}`)))
  assert.deepEqual(results.map((r) => r.status), ['fulfilled', 'fulfilled', 'fulfilled', 'rejected', 'rejected'])
  assert.ok(results.slice(3).every((r) => r.reason.code === 'HUBMSG_QUEUE_FULL'))
  assert.equal(off.stats().depth, 4)
  // One too large among plain sends: only it is refused.
  await off.close()
  const off2 = await DeviceClient.fromConnectionString(down, { inMemory: true, retry: { never: true } })
  const mixed = await Promise.allSettled([off2.send('ok'), off2.send(Buffer.alloc(256 * 1024 + 1)), off2.send('ok too')])
  assert.deepEqual(mixed.map((r) => r.status), ['fulfilled', 'rejected', 'fulfilled'])
  assert.equal(mixed[1].reason.code, 'HUBMSG_MESSAGE_TOO_LARGE')
  // Sends handed over by close(): each settles (queued before the close, or HUBMSG_CLOSED).
  const closing = off2.send('at close')
  await off2.close()
  const r = await Promise.allSettled([closing])
  assert.ok(r[0].status === 'fulfilled' || r[0].reason.code === 'HUBMSG_CLOSED', `${r[0].reason}`)
  await assert.rejects(async () => off2.send('after close'), (e) => e.code === 'HUBMSG_CLOSED')
})
