// Real processes: a script that closes its clients exits by itself (callbacks and pending
// pulls released); a device process SIGKILLed mid-send and restarted on its outbox loses no
// message whose send resolved; engine logs reach a JS function and the HUBMSG_LOG switch.
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { createInterface } from 'node:readline'
import { DeviceClient, setLogHandler } from '../index.js'
import { PKG, startHub, until, runNode } from './helpers.mjs'

let h
before(async () => {
  h = await startHub()
})
after(async () => {
  await h.stop()
})

test('a script that closes its clients exits by itself, with callbacks and pulls pending', async () => {
  const [id, cs] = await h.device('exit')
  await h.service.sendC2d(id, 'one for the handler')
  const code = `
    import { DeviceClient, ServiceClient, setLogHandler } from 'hubmsg'
    const [cs, scs] = process.argv.slice(1)
    setLogHandler(() => {}, 'debug')               // weak: never keeps Node alive
    const dev = await DeviceClient.fromConnectionString(cs, { inMemory: true })
    const got = new Promise((resolve) => dev.onMessage((m) => { m.complete(); resolve() }))
    dev.onStatus(() => {})
    await got
    const svc = await ServiceClient.fromConnectionString(scs)
    const events = await svc.events('exit-test', { from: 'latest' })
    const pendingEvent = events.next()              // pending when the stream closes
    const fb = svc.feedback()
    const pendingBatch = fb.next()                  // pending when the client closes
    await dev.close()
    const dev2 = await DeviceClient.fromConnectionString(cs, { inMemory: true })
    const iterated = (async () => { for await (const m of dev2.messages()) m.complete(); return 'ended' })()
    await dev2.close()
    await events.close()
    await svc.close()
    console.log(await pendingEvent, await pendingBatch, await iterated)
    console.log('closed')
  `
  const r = await runNode(code, [cs, h.hub.serviceConnectionString], { timeoutMs: 30_000 })
  assert.equal(r.signal, null, `killed after ${r.ms} ms: did not exit by itself\n${r.stderr}`)
  assert.equal(r.code, 0, r.stderr)
  assert.match(r.stdout, /null null ended\nclosed/)
})

test('an open client with a callback keeps Node running until it is closed', async () => {
  const [, cs] = await h.device('alive')
  const code = `
    import { DeviceClient } from 'hubmsg'
    const dev = await DeviceClient.fromConnectionString(process.argv[1], { inMemory: true })
    dev.onMessage((m) => m.complete())
    setTimeout(async () => { console.log('still running'); await dev.close() }, 500).unref()
  `
  const r = await runNode(code, [cs], { timeoutMs: 30_000 })
  assert.equal(r.code, 0, r.stderr)
  assert.match(r.stdout, /still running/)
})

const SENDER = `
  import { DeviceClient } from 'hubmsg'
  const [cs, outboxDir, total, start] = [process.argv[1], process.argv[2], +process.argv[3], +process.argv[4]]
  const dev = await DeviceClient.fromConnectionString(cs, { outboxDir })
  for (let i = start; i < total; i += 50) {
    const batch = []
    for (let j = i; j < Math.min(i + 50, total); j++) batch.push({ body: String(j), messageId: String(j) })
    await dev.sendMany(batch)
    process.stdout.write(batch.at(-1).messageId + '\\n')  // only after the batch is durable
  }
  await dev.flush(120_000)
  await dev.close()
  console.log('done')
`

test('a device process SIGKILLed mid-send and restarted on its outbox loses nothing', async () => {
  const total = 10_000
  const [, cs] = await h.device('crash')
  const outbox = h.outbox('crash')
  const child = spawn(process.execPath, ['--input-type=module', '-e', SENDER, cs, outbox, String(total), '0'], {
    cwd: PKG,
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  let acked = -1
  const lines = createInterface({ input: child.stdout })
  const exited = new Promise((r) => child.on('exit', (code, signal) => r(signal)))
  for await (const line of lines) {
    if (/^\d+$/.test(line)) acked = Math.max(acked, +line)
    if (acked >= 3_000 && child.exitCode === null) child.kill('SIGKILL')
  }
  assert.equal(await exited, 'SIGKILL')
  assert.ok(acked >= 3_000 && acked < total - 1, `acked ${acked}`)
  const rest = await runNode(SENDER, [cs, outbox, String(total), String(acked + 1)], { timeoutMs: 300_000 })
  assert.equal(rest.code, 0, rest.stderr)
  assert.match(rest.stdout, /done\n$/)
  const seen = new Set()
  const stream = await h.service.events('crash-check', { from: 'earliest' })
  while (seen.size < total) {
    const ev = await stream.next(30_000)
    assert.ok(ev, `${total - seen.size} messages lost`)
    if (ev.deviceId.startsWith('crash-')) seen.add(ev.messageId)
    ev.ack()
  }
  await stream.close()
  for (let i = 0; i < total; i++) assert.ok(seen.has(String(i)), `message ${i} lost`)
})

test('engine logs reach a JS handler on the JS thread', async () => {
  const [, cs] = await h.device('logs')
  const records = []
  setLogHandler((level, target, message) => records.push({ level, target, message }), 'debug')
  try {
    const bad = cs.replace(/SharedAccessKey=.*$/, 'SharedAccessKey=a2V5a2V5a2V5')
    const dev = await DeviceClient.fromConnectionString(bad, { inMemory: true, retry: { never: true } })
    assert.ok(await until(() => dev.status === 'failed'))
    assert.ok(await until(() => records.some((r) => /connection failed/.test(r.message))), JSON.stringify(records.slice(0, 5)))
    await dev.close()
  } finally {
    setLogHandler(null)
  }
  assert.ok(records.every((r) => r.target.startsWith('hubmsg') && ['error', 'warn', 'info', 'debug', 'trace'].includes(r.level)))
})

test('HUBMSG_LOG=debug prints engine logs to stderr', async () => {
  const code = `
    import { DeviceClient } from 'hubmsg'
    const dev = await DeviceClient.fromConnectionString('HostName=127.0.0.1:1;DeviceId=d;SharedAccessKey=a2V5a2V5a2V5', { inMemory: true, retry: { never: true } })
    while (dev.status !== 'failed') await new Promise((r) => setTimeout(r, 10))
    await dev.close()
  `
  const r = await runNode(code, [], { timeoutMs: 30_000, env: { HUBMSG_LOG: 'debug' } })
  assert.equal(r.code, 0, r.stderr)
  assert.match(r.stderr, /hubmsg (WARN|DEBUG|INFO|ERROR) hubmsg_core::/)
  const quiet = await runNode(code, [], { timeoutMs: 30_000, env: { HUBMSG_LOG: '' } })
  assert.doesNotMatch(quiet.stderr, /hubmsg_core::/)
})
