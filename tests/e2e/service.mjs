// The Node service of the four-language end-to-end test (tests/e2e/run.mjs drives it), one of
// the two members of consumer group E2E_GROUP (the Python service, service.py, is the other; the
// same rules and output). Environment: HUBMSG_SERVICE_CONNECTION_STRING, E2E_GROUP.
import { createInterface } from 'node:readline'
import { ServiceClient } from 'hubmsg'

const ACTIONS = ['complete', 'reject', 'abandon']
const line = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
let stopping = false
const input = createInterface({ input: process.stdin })
input.on('line', (l) => { if (l.trim() === 'stop') stopping = true })
input.on('close', () => { stopping = true })

/** The command an event asks for ([id, action]), if any (the same rule as service.py). */
function commandFor(messageId) {
  const m = /-(\d+)$/.exec(messageId)
  if (!m || Number(m[1]) % 10) return null
  return [`cmd-${messageId}`, ACTIONS[Math.floor(Number(m[1]) / 10) % 3]]
}

const svc = await ServiceClient.fromConnectionString(process.env.HUBMSG_SERVICE_CONNECTION_STRING)
const feedback = (async () => {
  const stream = svc.feedback()
  while (!stopping) {
    const batch = await stream.next(500)
    if (!batch) continue
    for (const r of batch.records) line({ feedback: r.originalMessageId, status: r.status, device: r.deviceId })
    batch.ack()
  }
})()
const stream = await svc.events(process.env.E2E_GROUP, { from: 'earliest' })
line({ ready: true })
let events = 0
const sends = []
while (!stopping) {
  const ev = await stream.next(500)
  if (!ev) continue
  const mid = ev.messageId ?? ''
  line({ event: mid, device: ev.deviceId, partition: ev.partition })
  const cmd = commandFor(mid)
  if (cmd) {
    const [id, action] = cmd
    line({ command: id, device: ev.deviceId, action })
    // Not awaited in the loop: while the hub is down the send waits in the client's outbox.
    sends.push(svc.sendC2d(ev.deviceId, action, { messageId: id, ack: 'full', ttlMs: 600_000 }).then((r) => line({ accepted: r.messageId })))
  }
  ev.ack()
  events++
  if (events % 100 === 0) await stream.checkpoint().catch((e) => console.error(`checkpoint: ${e.code} ${e.message}`))
}
await Promise.all(sends)
await stream.close()
await feedback
line({ done: true, events })
await svc.close()
input.close()
process.stdin.destroy()
