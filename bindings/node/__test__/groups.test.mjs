// Consumer groups: readers of one group share the partitions (each event to one of them),
// another group reads everything on its own, checkpoints resume a group, `from` positions;
// a slow reader is back-pressured by the hub's window, not buffered without bound.
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { DeviceClient } from '../index.js'
import { startHub, until } from './helpers.mjs'

let h
before(async () => {
  h = await startHub({ partitions: 4 })
})
after(async () => {
  await h.stop()
})

async function produce(n, prefix) {
  const ids = []
  for (let d = 0; d < 8; d++) {
    const [, cs] = await h.device(`${prefix}${d}`)
    const dev = await DeviceClient.fromConnectionString(cs, { inMemory: true })
    const batch = Array.from({ length: n / 8 }, (_, i) => ({ body: `${d}/${i}`, messageId: `${prefix}-${d}-${i}` }))
    ids.push(...batch.map((b) => b.messageId))
    await dev.sendMany(batch)
    await dev.flush(30_000)
    await dev.close()
  }
  return ids
}

test('two readers of one group share the partitions; another group gets everything', async () => {
  // Both readers join before there are events, so no partition moves while they read (a
  // partition that moves is read again from its checkpoint by its new owner: at-least-once).
  const a = await h.service.events('workers', { from: 'earliest' })
  const b = await h.service.events('workers', { from: 'earliest' })
  const other = await h.service.events('audit', { from: 'earliest' })
  const ids = await produce(400, 'share')
  const got = { a: new Map(), b: new Map(), other: new Set() }
  const read = async (stream, into, key) => {
    for await (const ev of stream) {
      if (!ev.messageId.startsWith('share-')) {
        ev.ack()
        continue
      }
      if (key) into.set(ev.messageId, ev.partition)
      else into.add(ev.messageId)
      ev.ack()
    }
  }
  const readers = [read(a, got.a, true), read(b, got.b, true), read(other, got.other)]
  const all = () => new Set([...got.a.keys(), ...got.b.keys()])
  assert.ok(await until(() => all().size === 400 && got.other.size === 400, 30_000), `a ${got.a.size} b ${got.b.size} other ${got.other.size}`)
  const pa = new Set(got.a.values())
  const pb = new Set(got.b.values())
  assert.ok(pa.size > 0 && pb.size > 0, `partitions a ${[...pa]} b ${[...pb]}: one reader got nothing`)
  assert.deepEqual([...pa].filter((p) => pb.has(p)), [], 'a partition was read by both members')
  assert.deepEqual([...all()].sort(), [...ids].sort())
  await a.checkpoint()
  await b.checkpoint()
  await Promise.all([a.close(), b.close(), other.close()])
  await Promise.all(readers)
})

test('a group resumes at its checkpoint; from: latest / sequence / Date', async () => {
  const first = await produce(80, 'ckpt1')
  const s = await h.service.events('resume', { from: 'earliest' })
  const seen = new Set()
  let lastSeq = new Map()
  while (!first.every((id) => seen.has(id))) {
    const ev = await s.next(30_000)
    assert.ok(ev)
    seen.add(ev.messageId)
    lastSeq.set(ev.partition, ev.sequenceNumber)
    ev.ack()
  }
  await s.checkpoint()
  await s.close()
  const second = await produce(80, 'ckpt2')
  const again = await h.service.events('resume') // resumes at the checkpoint (an explicit `from` would move it)
  const after = new Set()
  while (!second.every((id) => after.has(id))) {
    const ev = await again.next(30_000)
    assert.ok(ev, `missing ${second.filter((id) => !after.has(id)).length}`)
    after.add(ev.messageId)
    ev.ack()
  }
  assert.deepEqual(first.filter((id) => after.has(id)), [], 'checkpointed events were read again')
  await again.close()
  const latest = await h.service.events('fresh-latest', { from: 'latest' })
  assert.equal(await latest.next(300), null)
  await latest.close()
  const since = await h.service.events('fresh-date', { from: new Date(Date.now() + 3_600_000) })
  assert.equal(await since.next(300), null)
  await since.close()
  const bySeq = await h.service.events('fresh-seq', { from: 0 })
  assert.ok(await bySeq.next(10_000))
  await bySeq.close()
})

test('a slow reader is back-pressured: at most the hub window waits in the client', async () => {
  const one = await startHub({ partitions: 1 }) // the hub's window is 1,000 events per partition
  try {
    const [, cs] = await one.device('flood')
    const dev = await DeviceClient.fromConnectionString(cs, { inMemory: true })
    await dev.sendMany(Array.from({ length: 5000 }, (_, i) => ({ body: 'x'.repeat(64), messageId: `flood-${i}` })))
    await dev.flush(60_000)
    await dev.close()
    const s = await one.service.events('slow', { from: 'earliest' })
    const first = await s.next(30_000)
    assert.ok(first)
    // Nothing acknowledged: the hub stops at 1,000 unacknowledged events; one was pulled.
    assert.ok(await until(() => s.buffered === 999, 30_000), `buffered ${s.buffered}`)
    let max = 0
    const deadline = Date.now() + 1000
    while (Date.now() < deadline) {
      max = Math.max(max, s.buffered)
      await new Promise((r) => setTimeout(r, 20))
    }
    assert.equal(max, 999, 'events beyond the window reached the client')
    // Acknowledging lets the rest flow, one pull at a time.
    first.ack()
    let n = 1
    for await (const ev of s) {
      assert.equal(ev.messageId, `flood-${n}`)
      ev.ack()
      if (++n === 5000) break
    }
    assert.equal(n, 5000)
    await s.close()
  } finally {
    await one.stop()
  }
})
