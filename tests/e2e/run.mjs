// The four-language end-to-end test: one `hubmsg hub` process; a C device (device.c, built like
// examples/c), a Python device (device.py) and a Node device (device.mjs) send telemetry; a
// Python service (service.py) and a Node service (service.mjs) read the events as the two
// members of one consumer group (sharing its partitions) and send C2D commands that each device
// completes, rejects or abandons; the hub is SIGKILLed once every device sent half its messages
// (the devices send the other half while it is down) and restarted on the same port and data.
// At the end the accounting shows, per language, every D2C message received and every C2D
// command's feedback with the outcome its device chose. Prints `e2e: N passed, M failed`.
//
// node tests/e2e/run.mjs  (tests/e2e.sh builds what it needs first). Environment: E2E_HUBMSG
// (the hubmsg binary), E2E_C_DEVICE (the built device.c), E2E_PYTHON (a python with hubmsg
// installed), E2E_COUNT (messages per device, default 300), E2E_DEADLINE_S (default 180).
import { spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { ServiceClient } from 'hubmsg'

const here = fileURLToPath(new URL('.', import.meta.url))
const root = join(here, '../..')
const HUBMSG = process.env.E2E_HUBMSG ?? join(root, 'target/release/hubmsg')
const C_DEVICE = process.env.E2E_C_DEVICE ?? join(root, 'target/e2e/device')
const PYTHON = process.env.E2E_PYTHON ?? join(root, 'target/py-venv/bin/python')
const COUNT = Number(process.env.E2E_COUNT ?? 300)
const DEADLINE = Date.now() + 1000 * Number(process.env.E2E_DEADLINE_S ?? 180)
const GROUP = 'e2e'
// Device ids chosen to land on both partitions of a 2-partition hub (crc32c(id) % 2: 1, 1, 0),
// so both members of the group get events.
const DEVICES = [
  { lang: 'c', id: 'c-device', cmd: [C_DEVICE], prefix: 'c' },
  { lang: 'python', id: 'python-device', cmd: [PYTHON, join(here, 'device.py')], prefix: 'py' },
  { lang: 'node', id: 'node-device', cmd: [process.execPath, join(here, 'device.mjs')], prefix: 'node' },
]
const SERVICES = [
  { lang: 'python', cmd: [PYTHON, join(here, 'service.py')] },
  { lang: 'node', cmd: [process.execPath, join(here, 'service.mjs')] },
]
const EXPECTED = { complete: 'Success', reject: 'Rejected', abandon: 'DeliveryCountExceeded' }
const ACTIONS = ['complete', 'reject', 'abandon']

const dir = mkdtempSync(join(tmpdir(), 'hubmsg-e2e-'))
let changed = () => {}
/** Resolves when `cond()` holds, re-checked whenever a child prints a line or exits; false at
 * `deadline` (default: the run's). */
function until(cond, what, deadline = DEADLINE) {
  return new Promise((resolve) => {
    const check = () => {
      if (cond()) return done(true)
      if (Date.now() > deadline) return done(false)
    }
    const timer = setTimeout(() => done(cond()), Math.max(0, deadline - Date.now()))
    const prev = changed
    changed = () => { prev(); check() }
    function done(ok) {
      clearTimeout(timer)
      changed = prev
      if (!ok) console.log(`timed out waiting for ${what}`)
      resolve(ok)
    }
    check()
  })
}

/** A child printing JSON lines: `lines` collects them, `exit` resolves to its exit code. */
function child(name, cmd, env) {
  const p = spawn(cmd[0], cmd.slice(1), { env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'pipe'] })
  const c = { name, p, lines: [], stderr: '', code: null }
  c.exit = new Promise((resolve) => p.on('exit', (code, signal) => { c.code = code ?? signal; changed(); resolve(c.code) }))
  p.on('error', (e) => { c.stderr += `cannot start ${cmd[0]}: ${e.message}\n` })
  createInterface({ input: p.stdout }).on('line', (l) => {
    try {
      c.lines.push(JSON.parse(l))
    } catch {
      c.stderr += `stdout: ${l}\n`
    }
    changed()
  })
  p.stderr.on('data', (d) => { c.stderr += d })
  c.has = (key) => c.lines.some((l) => key in l)
  c.say = (word) => { if (p.stdin.writable) p.stdin.write(word + '\n') }
  return c
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
    s.on('error', reject)
  })
}

/** `hubmsg hub` on the port and data directory; resolves with its owner connection string. */
async function startHub(port) {
  const p = spawn(HUBMSG, ['hub', '--data', join(dir, 'hub'), '--mqtt', `127.0.0.1:${port}`, '--partitions', '2', '--feedback-interval', '200ms'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  const cs = await new Promise((resolve, reject) => {
    p.on('exit', (code) => reject(new Error(`the hub exited (${code}) before it was ready`)))
    createInterface({ input: p.stdout }).on('line', (l) => {
      const m = /^HUBMSG_HUB_CONNECTION_STRING_FILE=(.*)$/.exec(l)
      if (m) resolve(readFileSync(m[1], 'utf8').trim())
    })
  })
  p.removeAllListeners('exit')
  return { p, cs }
}

const results = []
function check(name, ok, detail = '') {
  results.push(ok)
  console.log(`${ok ? 'ok' : 'FAIL'} ${name}${detail ? ` (${detail})` : ''}`)
}

const port = await freePort()
let hub = await startHub(port)
const admin = await ServiceClient.fromConnectionString(hub.cs)
for (const d of DEVICES) {
  await admin.createDevice(d.id)
  d.cs = await admin.deviceConnectionString(d.id)
}
await admin.close()

const services = SERVICES.map((s) => ({ ...s, c: child(`${s.lang} service`, s.cmd, { HUBMSG_SERVICE_CONNECTION_STRING: hub.cs, E2E_GROUP: GROUP }) }))
await until(() => services.every((s) => s.c.has('ready')), 'both services to open the group')
const devices = DEVICES.map((d) => ({
  ...d,
  c: child(`${d.lang} device`, d.cmd, { HUBMSG_DEVICE_CONNECTION_STRING: d.cs, E2E_OUTBOX: join(dir, `outbox-${d.lang}`), E2E_PREFIX: d.prefix, E2E_COUNT: String(COUNT) }),
}))
const all = () => [...services.map((s) => s.c), ...devices.map((d) => d.c)]

let crashed = false
if (await until(() => devices.every((d) => d.c.has('half')), 'every device to send half its messages')) {
  hub.p.kill('SIGKILL')
  await new Promise((resolve) => hub.p.on('exit', resolve))
  console.log(`hub SIGKILLed after every device sent ${COUNT / 2} messages; the devices send the rest while it is down`)
  for (const d of devices) d.c.say('go')
  await until(() => devices.every((d) => d.c.has('sent')), 'every device to queue the rest in its outbox')
  hub = await startHub(port)
  crashed = true
  console.log('hub restarted on the same port and data directory')
}

// What should arrive: every D2C message of every device, and feedback for every command.
const wanted = new Map(devices.map((d) => [d.lang, Array.from({ length: COUNT }, (_, i) => `${d.prefix}-${i}`)]))
const commandsOf = (d) => wanted.get(d.lang).filter((_, i) => i % 10 === 0).map((mid) => {
  const i = Number(mid.split('-').pop())
  return { id: `cmd-${mid}`, action: ACTIONS[Math.floor(i / 10) % 3] }
})
const seen = () => new Set(services.flatMap((s) => s.c.lines.filter((l) => l.event).map((l) => l.event)))
const feedback = () => {
  const m = new Map()
  for (const s of services) for (const l of s.c.lines) if (l.feedback) m.set(l.feedback, [...(m.get(l.feedback) ?? []), l.status])
  return m
}
const complete = () => {
  const s = seen()
  const f = feedback()
  return devices.every((d) => wanted.get(d.lang).every((m) => s.has(m)) && commandsOf(d).every((c) => f.has(c.id)))
}
await until(complete, 'every D2C message and every C2D feedback record')

// Shutting down gets its own minute, also after a timeout above (to report what exited).
for (const d of devices) d.c.say('stop')
await until(() => devices.every((d) => d.c.code !== null), 'the devices to flush and exit', Date.now() + 60_000)
for (const s of services) s.c.say('stop')
await until(() => services.every((s) => s.c.code !== null), 'the services to exit', Date.now() + 60_000)
for (const c of all()) if (c.code === null) c.p.kill('SIGKILL')
hub.p.kill('SIGTERM')
await new Promise((resolve) => hub.p.on('exit', resolve))

// The accounting.
const s = seen()
const f = feedback()
const rows = []
check('the hub was SIGKILLed and restarted mid-run', crashed)
for (const d of devices) {
  const ids = wanted.get(d.lang)
  const received = ids.filter((m) => s.has(m)).length
  const copies = services.flatMap((x) => x.c.lines.filter((l) => l.event?.startsWith(`${d.prefix}-`))).length
  const cmds = commandsOf(d)
  const settled = new Map()
  for (const l of d.c.lines) if (l.c2d) settled.set(l.c2d, [...(settled.get(l.c2d) ?? []), l.action])
  const right = cmds.filter((c) => (f.get(c.id) ?? []).includes(EXPECTED[c.action]))
  const wrong = cmds.filter((c) => (f.get(c.id) ?? []).some((st) => st !== EXPECTED[c.action]))
  const unsettled = cmds.filter((c) => !(settled.get(c.id) ?? []).includes(c.action))
  const done = d.c.lines.find((l) => l.done) ?? {}
  rows.push({
    device: `${d.lang} (${d.id})`,
    'd2c sent': ids.length,
    received,
    lost: ids.length - received,
    duplicates: copies - received,
    commands: cmds.length,
    'settled by device': cmds.length - unsettled.length,
    'feedback as chosen': right.length,
    'wrong feedback': wrong.length,
  })
  check(`${d.lang} device: every D2C message reached the group`, received === ids.length, `${received} of ${ids.length}`)
  check(`${d.lang} device: every command was settled as asked`, unsettled.length === 0, unsettled.slice(0, 3).map((c) => c.id).join(' '))
  check(`${d.lang} device: every command's feedback is the outcome it chose`, right.length === cmds.length && wrong.length === 0,
    `${right.length} of ${cmds.length}, ${wrong.length} contradicting`)
  check(`${d.lang} device: outbox empty at exit, exit 0`, done.flushed === true && done.depth === 0 && d.c.code === 0, `flushed ${done.flushed} depth ${done.depth} exit ${d.c.code}`)
}
console.table(rows)
const svcRows = services.map((x) => {
  const ev = x.c.lines.filter((l) => l.event)
  return {
    service: x.lang,
    events: ev.length,
    partitions: [...new Set(ev.map((l) => l.partition))].sort().join(','),
    'commands sent': x.c.lines.filter((l) => l.command).length,
    accepted: x.c.lines.filter((l) => l.accepted).length,
    'feedback records': x.c.lines.filter((l) => l.feedback).length,
  }
})
console.table(svcRows)
for (const r of svcRows) {
  check(`${r.service} service: read events as a member of group ${GROUP}, exit 0`, r.events > 0 && services.find((x) => x.lang === r.service).c.code === 0,
    `${r.events} events, partitions ${r.partitions}`)
}
for (const c of all()) {
  if (c.code !== 0 && c.stderr) console.log(`--- ${c.name} stderr:\n${c.stderr.slice(-3000)}`)
}
rmSync(dir, { recursive: true, force: true })
const failed = results.filter((ok) => !ok).length
console.log(`e2e: ${results.length - failed} passed, ${failed} failed`)
process.exitCode = failed ? 1 : 0
