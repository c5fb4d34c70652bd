// offline_buffering [count]: the device keeps sending while the hub is down; its durable outbox
// holds the messages, and once the hub is back they are all delivered — none lost.
//
// 1. start a hub (embedded, 127.0.0.1 port 0), register the device, stop the hub;
// 2. send `count` messages (default 100): each send resolves once the message is durable locally;
// 3. start the hub again on the same address and data directory;
// 4. the device reconnects and delivers; a consumer checks every message id arrived.
//
// Exit status 0 only when nothing was lost.
import { DeviceClient, ServiceClient } from 'hubmsg'
import { Demo } from './example.mjs'

const count = Number(process.argv[2] ?? 100)
const demo = new Demo()
const cs = await (await demo.start()).createDevice('field-unit-7')
await demo.stopHub() // the hub goes down
console.log('hub stopped')
const dev = await DeviceClient.fromConnectionString(cs, {
  outboxDir: demo.path('outbox'),
  maxMessages: 100_000,
  maxBytes: 64 << 20,
  overflow: 'reject',
  retry: { initialDelayMs: 50, maxDelayMs: 500, jitterMs: 50 },
})
let last = ''
dev.onStatus((s) => {
  if (s.status !== last && s.status !== 'retrying') console.log(`device: ${s.status} ${s.reason}`)
  last = s.status
})
for (let i = 0; i < count; i++) await dev.send(`offline-${i}`, { messageId: `offline-${i}` }) // durable in the outbox: safe
let st = dev.stats()
console.log(`queued ${st.depth} messages while the hub was down (delivered so far: ${st.delivered})`)

const hub = await demo.start() // the hub is back, same address and data
console.log(`hub restarted on ${hub.address}`)
await dev.flush(120_000)
const retries = dev.stats().retries
await dev.close()

// Check at the hub: every id arrived (duplicates are allowed: at-least-once).
const seen = new Set()
let duplicates = 0
const svc = await ServiceClient.fromConnectionString(hub.serviceConnectionString)
const stream = await svc.events('$Default', { from: 'earliest' })
while (seen.size < count) {
  const ev = await stream.next(30_000)
  if (ev === null) break
  const mid = ev.messageId ?? ''
  if (mid.startsWith('offline-')) {
    duplicates += seen.has(mid) ? 1 : 0
    seen.add(mid)
  }
  ev.ack()
}
await stream.checkpoint()
await stream.close()
await svc.close()
console.log(`sent ${count} while the hub was down, received ${seen.size} distinct, lost ${count - seen.size} (duplicates ${duplicates}, retries ${retries})`)
await demo.close()
process.exitCode = seen.size === count ? 0 : 1
