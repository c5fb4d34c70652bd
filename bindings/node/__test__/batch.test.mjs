// Batched pulls: `EventStream.nextBatch(max, timeoutMs)` and `C2dStream.nextBatch` — bounded by
// count (and bytes), an empty array on timeout, null once closed (also for a pull that waits),
// batched events acknowledged one by one as before, the hub's window still bounds a reader that
// acknowledges nothing, and the `for await` iteration (which reads in batches) loses nothing
// when it breaks.
import { afterEach, beforeEach, test } from 'node:test'
import assert from 'node:assert/strict'
import { DeviceClient } from '../index.js'
import { startHub, until } from './helpers.mjs'

// A hub of its own per test (each reads its groups from the earliest event), with one
// partition: one order, and a window of 1,000 events.
let h
beforeEach(async () => {
  h = await startHub({ partitions: 1 })
})
afterEach(async () => {
  await h.stop()
})

/** Sends `n` events `${prefix}-${i}` from a fresh device and waits until the hub has them. */
async function produce(n, prefix, body = 'x'.repeat(64)) {
  const [, cs] = await h.device(prefix)
  const dev = await DeviceClient.fromConnectionString(cs, { inMemory: true })
  await dev.sendMany(Array.from({ length: n }, (_, i) => ({ body, messageId: `${prefix}-${i}` })))
  await dev.flush(60_000)
  await dev.close()
}

/** A reader of `group` (from the earliest event, or its checkpoint), with `n` events received. */
async function reader(group, n, options = { from: 'earliest' }) {
  const s = await h.service.events(group, options)
  assert.ok(await until(() => s.buffered >= n, 30_000), `buffered ${s.buffered} of ${n}`)
  return s
}

test('nextBatch is bounded by its count, keeps the order, and shares it with next()', async () => {
  await produce(50, 'bounds')
  const s = await reader('bounds', 50)
  const ids = (b) => b.map((e) => e.messageId)
  const a = await s.nextBatch(20, 10_000)
  assert.deepEqual(ids(a), Array.from({ length: 20 }, (_, i) => `bounds-${i}`))
  assert.equal((await s.next(10_000)).messageId, 'bounds-20')
  const b = await s.nextBatch(undefined, 10_000) // default count: 100, here the 29 left
  assert.deepEqual(ids(b), Array.from({ length: 29 }, (_, i) => `bounds-${i + 21}`))
  for (const ev of [...a, ...b]) ev.ack()
  for (const bad of [0, -1, 1.5, 10_001, Number.NaN]) {
    await assert.rejects(async () => s.nextBatch(bad, 10), (e) => e.code === 'HUBMSG_INVALID_ARGUMENT' && /max/.test(e.message), `max ${bad}`)
  }
  await assert.rejects(async () => s.nextBatch(1, -5), (e) => e.code === 'HUBMSG_INVALID_ARGUMENT')
  await s.close()
})

test('nextBatch resolves to [] on timeout, and to null once closed, also while it waits', async () => {
  const s = await h.service.events('timeouts', { from: 'latest' })
  const t0 = Date.now()
  assert.deepEqual(await s.nextBatch(10, 100), [])
  assert.ok(Date.now() - t0 >= 90, 'returned before its timeout')
  const waiting = s.nextBatch(10) // no timeout: until an event arrives or the stream closes
  await s.close()
  assert.equal(await waiting, null)
  assert.equal(await s.nextBatch(10, 1000), null)
  assert.equal(s.closed, true)
})

test('batched events are acknowledged one by one: the group resumes after the acknowledged ones', async () => {
  await produce(30, 'acks')
  const s = await reader('acks', 30)
  const batch = await s.nextBatch(30, 10_000)
  assert.equal(batch.length, 30)
  for (const ev of batch.slice(0, 10)) ev.ack()
  await s.checkpoint()
  await s.close()
  const again = await reader('acks', 20, {}) // resumes at the checkpoint
  const rest = await again.nextBatch(100, 10_000)
  assert.equal(rest[0].messageId, 'acks-10', 'the checkpoint is past the 10 acknowledged, not the 20 others')
  assert.equal(rest.length, 20)
  for (const ev of rest) ev.ack()
  await again.close()
})

test('a reader that acknowledges nothing holds at most the hub window, batches or not', async () => {
  await produce(3000, 'window')
  const s = await reader('window', 1000)
  const first = await s.nextBatch(10_000, 10_000)
  assert.equal(first.length, 1000, 'a batch takes what waits, and no more than the window let through')
  assert.deepEqual(await s.nextBatch(10_000, 300), [], 'nothing beyond the window arrived')
  assert.equal(s.buffered, 0)
  for (const ev of first) ev.ack()
  const more = await s.nextBatch(10_000, 10_000)
  assert.ok(more.length >= 1 && more.length <= 1000, `${more.length}`)
  assert.equal(more[0].messageId, 'window-1000')
  await s.close()
})

test('for await reads in batches; a break leaves the rest for next() and the next iteration', async () => {
  await produce(40, 'iter')
  const s = await reader('iter', 40)
  const got = []
  for await (const ev of s) {
    got.push(ev.messageId)
    ev.ack()
    if (got.length === 5) break
  }
  assert.ok(s.buffered >= 35, `the 35 not handed out are still counted: ${s.buffered}`)
  got.push((await s.next(10_000)).messageId)
  got.push(...(await s.nextBatch(4, 10_000)).map((e) => e.messageId))
  for await (const ev of s) {
    got.push(ev.messageId)
    ev.ack()
    if (got.length === 40) break
  }
  assert.deepEqual(got, Array.from({ length: 40 }, (_, i) => `iter-${i}`))
  await s.close()
  assert.equal(await s.next(100), null, 'closed: nothing left is handed out')
})

test('C2dStream.nextBatch takes the messages waiting; each is settled as before', async () => {
  const [id, cs] = await h.device('c2dbatch')
  const dev = await DeviceClient.fromConnectionString(cs, { inMemory: true })
  const stream = dev.messages()
  assert.deepEqual(await stream.nextBatch(10, 100), [])
  const sent = ['a', 'b', 'c'].map((body) => h.service.sendC2dAndWait(id, body, { timeoutMs: 30_000 }))
  const got = []
  while (got.length < 3) {
    const b = await stream.nextBatch(10, 30_000)
    assert.ok(b && b.length >= 1 && b.length <= 3, `batch ${b?.length}`)
    got.push(...b)
  }
  assert.deepEqual(got.map((m) => m.body.toString()).sort(), ['a', 'b', 'c'])
  got[0].complete()
  got[1].reject()
  got[2].complete()
  const statuses = (await Promise.all(sent)).map((r) => r.status).sort()
  assert.deepEqual(statuses, ['Rejected', 'Success', 'Success'])
  const waiting = stream.nextBatch(10)
  await dev.close()
  assert.equal(await waiting, null, 'a pull waiting when the client closes ends')
})
