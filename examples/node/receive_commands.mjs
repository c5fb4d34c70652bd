// receive_commands [count]: a device receives cloud-to-device commands with receive(timeout),
// completes the ones it can execute and rejects the others, until `count` commands arrived
// (default 5) or 30 s passed without one.
//
// HUBMSG_DEVICE_CONNECTION_STRING: the device (else: demo mode, where an embedded hub and a
// service send the commands with feedback "full" and the outcomes are printed at the end).
import { DeviceClient, ServiceClient } from 'hubmsg'
import { Demo } from './example.mjs'

async function sendCommands(svc, count) {
  for (let i = 0; i < count; i++) {
    const body = i % 4 === 3 ? 'self-destruct' : 'open-valve'
    await svc.sendC2d('valve-1', body, { messageId: `cmd-${i}`, ack: 'full', ttlMs: 60_000 })
  }
}

async function printFeedback(svc, count) {
  let seen = 0
  const stream = svc.feedback()
  while (seen < count) {
    const batch = await stream.next(30_000)
    if (batch === null) break
    for (const r of batch.records) {
      console.log(`feedback: ${r.originalMessageId} -> ${r.description}`)
      seen++
    }
    batch.ack()
  }
}

const count = Number(process.argv[2] ?? 5)
let cs = process.env.HUBMSG_DEVICE_CONNECTION_STRING
let demo = null
let svc = null
if (!cs) {
  demo = new Demo()
  const hub = await demo.start()
  cs = await hub.createDevice('valve-1')
  svc = await ServiceClient.fromConnectionString(hub.serviceConnectionString)
  await sendCommands(svc, count)
}
const dev = await DeviceClient.fromConnectionString(cs, { inMemory: true })
let received = 0
while (received < count) {
  const cmd = await dev.receive(30_000)
  if (cmd === null) {
    console.log('no command for 30 s; stopping')
    break
  }
  const known = cmd.body.toString() === 'open-valve'
  console.log(`command ${cmd.messageId}: ${cmd.body} -> ${known ? 'complete' : 'reject'}`)
  if (known) cmd.complete()
  else cmd.reject()
  received++
}
console.log(`received ${received} commands`)
if (svc) await printFeedback(svc, received)
await dev.close()
await svc?.close()
await demo?.close()
process.exitCode = received === count ? 0 : 1
