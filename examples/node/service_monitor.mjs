// service_monitor [count]: a back-end service lists the registered devices, then reads D2C
// telemetry from consumer group "monitor" (acknowledging each event and checkpointing at the
// end) until `count` events arrived (default 20) or 30 s passed.
//
// HUBMSG_SERVICE_CONNECTION_STRING: a policy connection string (else: demo mode, where an
// embedded hub and a device produce the telemetry).
import { DeviceClient, ServiceClient } from 'hubmsg'
import { Demo } from './example.mjs'

async function produce(cs, count) {
  const dev = await DeviceClient.fromConnectionString(cs, { inMemory: true })
  await dev.sendMany(Array.from({ length: count }, (_, i) => `reading ${i}`))
  await dev.flush(30_000)
  await dev.close()
}

const count = Number(process.argv[2] ?? 20)
let cs = process.env.HUBMSG_SERVICE_CONNECTION_STRING
let demo = null
if (!cs) {
  demo = new Demo()
  const hub = await demo.start()
  cs = hub.serviceConnectionString
  await produce(await hub.createDevice('thermostat-1'), count)
}
const svc = await ServiceClient.fromConnectionString(cs)
for (const d of await svc.listDevices()) console.log(`device ${d.deviceId} (${d.status})`)
let events = 0
const stream = await svc.events('monitor', { from: 'earliest' })
while (events < count) {
  const ev = await stream.next(30_000)
  if (ev === null) break
  console.log(`[${ev.deviceId} p${ev.partition} #${ev.sequenceNumber}] ${ev.body.toString()}`)
  ev.ack()
  events++
}
await stream.checkpoint() // acknowledged events are not read again by "monitor"
await stream.close()
console.log(`received ${events} events`)
await svc.close()
await demo?.close()
process.exitCode = events >= count ? 0 : 1
