// Compiled by `tsc -p __test__/tsconfig.json` (tests/node.sh): the shipped index.d.ts must type
// real use of the API under --strict — async iterators, option objects, error codes.
import { DeviceClient, ServiceClient, Hub, setLogHandler, errorCodes } from '../index.js'
import type { C2dMessage, Event, FeedbackRecord, HubmsgError, HubmsgErrorCode, StatusInfo } from '../index.js'

export async function usage(dir: string): Promise<number> {
  const hub: Hub = await Hub.start(dir, { feedbackIntervalMs: 100, durability: 'always' })
  const cs: string = await hub.createDevice('typed')
  const dev = await DeviceClient.fromConnectionString(cs, { outboxDir: `${dir}/ob`, overflow: 'drop_oldest', retry: { maxDelayMs: 500 } })
  const d = await dev.send(Buffer.from('x'), { properties: { unit: 'C' }, expiry: new Date(), messageId: 'm' })
  const outcome: 'delivered' | 'expired' | 'dropped' | 'rejected' = await d.outcome(1000)
  await dev.sendMany(['a', { body: 'b', messageId: 'b' }])
  dev.onStatus((s: StatusInfo) => void s.status)
  for await (const msg of dev.messages()) {
    const m: C2dMessage = msg
    m.complete()
    break
  }
  const svc = await ServiceClient.fromConnectionString(hub.serviceConnectionString, { requestTimeoutMs: 5000 })
  const fb: FeedbackRecord = await svc.sendC2dAndWait('typed', 'cmd', { ack: 'full', timeoutMs: 1000 })
  const stream = await svc.events('$Default', { from: 'earliest' })
  for await (const ev of stream) {
    const e: Event = ev
    e.ack()
    break
  }
  for await (const batch of svc.feedback()) batch.ack()
  try {
    await svc.getDevice('nobody')
  } catch (err) {
    const code: HubmsgErrorCode = (err as HubmsgError).code
    if (!errorCodes().includes(code)) throw err
  }
  setLogHandler((level, target, message) => console.log(level, target, message), 'debug')
  setLogHandler(null)
  await Promise.all([stream.close(), dev.close(), svc.close()])
  await hub.shutdown()
  return outcome.length + fb.status.length + dev.stats().delivered
}
