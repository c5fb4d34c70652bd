// The Node device of the four-language end-to-end test (tests/e2e/run.mjs drives it); the same
// protocol as device.c: environment HUBMSG_DEVICE_CONNECTION_STRING, E2E_OUTBOX, E2E_COUNT,
// E2E_PREFIX; prints {"half":true}, waits for "go", prints {"sent":N}, waits for "stop", prints
// {"done":…}; settles every C2D command as its body says and prints {"c2d":ID,"action":…}.
import { createInterface } from 'node:readline'
import { DeviceClient } from 'hubmsg'

const line = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
const input = createInterface({ input: process.stdin })[Symbol.asyncIterator]()
async function waitFor(word) {
  for (;;) {
    const { value, done } = await input.next()
    if (done || value.trim() === word) return
  }
}

const prefix = process.env.E2E_PREFIX
const count = Number(process.env.E2E_COUNT)
const dev = await DeviceClient.fromConnectionString(process.env.HUBMSG_DEVICE_CONNECTION_STRING, {
  outboxDir: process.env.E2E_OUTBOX,
  retry: { initialDelayMs: 50, maxDelayMs: 500, jitterMs: 50 },
})
const receiving = (async () => {
  for await (const cmd of dev.messages()) { // ends when the client closes
    const action = cmd.body.toString()
    try {
      if (action === 'complete') cmd.complete()
      else if (action === 'reject') cmd.reject()
      else cmd.abandon()
    } catch (e) { // the connection dropped meanwhile: the hub redelivers
      console.error(`settle ${cmd.messageId}: ${e.code} ${e.message}`)
    }
    line({ c2d: cmd.messageId, action, seq: cmd.sequenceNumber })
  }
})()

async function send(lo, hi) {
  for (let i = lo; i < hi; i++) { // each send resolves once durable in the outbox
    await dev.send(JSON.stringify({ lang: 'node', seq: i }), { messageId: `${prefix}-${i}`, properties: { lang: 'node' } })
  }
}
await send(0, Math.floor(count / 2))
line({ half: true })
await waitFor('go')
await send(Math.floor(count / 2), count)
line({ sent: count })
await waitFor('stop')
let flushed = true
try {
  await dev.flush(60_000)
} catch (e) {
  if (e.code !== 'HUBMSG_TIMEOUT') throw e
  flushed = false
}
const st = dev.stats()
line({ done: true, flushed, delivered: st.delivered, depth: st.depth, connects: st.connects, c2dDuplicates: st.c2dDuplicates })
await dev.close() // ends the messages() loop
await receiving
process.stdin.destroy() // an open stdin pipe (readline) would keep Node running, hubmsg does not
