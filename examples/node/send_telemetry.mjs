// send_telemetry [count]: a device sends `count` telemetry readings (default 10) with
// properties and counts their outcomes, then waits until all are delivered.
//
// HUBMSG_DEVICE_CONNECTION_STRING: the device to send as (else: demo mode with an embedded hub).
// HUBMSG_OUTBOX_DIR: where the durable outbox lives (default: in the demo directory, or the
//                    engine's default with a connection string).
// HUBMSG_DURABILITY: always (default) | interval | never.
import { DeviceClient } from 'hubmsg'
import { Demo } from './example.mjs'

const count = Number(process.argv[2] ?? 10)
let cs = process.env.HUBMSG_DEVICE_CONNECTION_STRING
let outboxDir = process.env.HUBMSG_OUTBOX_DIR
let demo = null
if (!cs) {
  demo = new Demo()
  cs = await (await demo.start()).createDevice('sensor-1')
  outboxDir ??= demo.path('outbox')
}
const dev = await DeviceClient.fromConnectionString(cs, { outboxDir, durability: process.env.HUBMSG_DURABILITY ?? 'always' })
const deliveries = []
for (let i = 0; i < count; i++) {
  const body = JSON.stringify({ temperature: Number((20 + (i % 50) / 10).toFixed(1)), seq: i })
  deliveries.push(
    await dev.send(body, { // resolves once durable in the outbox
      contentType: 'application/json',
      contentEncoding: 'utf-8',
      properties: { unit: 'celsius', seq: String(i) },
    }),
  )
}
await dev.flush(120_000)
const outcomes = await Promise.all(deliveries.map((d) => d.outcome()))
const delivered = outcomes.filter((o) => o === 'delivered').length
const st = dev.stats()
console.log(`delivered ${delivered} of ${count} (outbox: ${st.delivered} delivered, ${st.depth} pending; ${st.connects} connects)`)
await dev.close()
await demo?.close()
process.exitCode = delivered === count ? 0 : 1
