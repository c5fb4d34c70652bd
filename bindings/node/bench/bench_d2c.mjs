// D2C throughput from one Node device, in one run:
//
// - hubmsg Node device -> `hubmsg hub` process -> an acknowledging consumer, 256 B bodies, QoS 1,
//   the device outbox and the hub log fsync'd (durability "always"), the sender driven the ways a
//   Node user sends fast: `sendMany` batches of 1,000 (one awaited at a time, and two outstanding: the next
//   batch built while the previous one becomes durable), and 1,000 `send()` Promises outstanding;
// - (a) mqtt.js QoS 1 publisher (10,000 messages outstanding) -> Mosquitto (Debian's package,
//   persistence on) -> an mqtt.js QoS 1 subscriber: what a Node user has today;
// - (b) the Rust client (`hubmsg device send --batch 1000`) -> the same kind of hub -> the same
//   consumer.
//
// Every sender and consumer is its own process, the consumer connected before the sender starts;
// the consumer of the hubmsg runs is the hubmsg Node service client (events of $Default read
// with `for await`, which pulls them in batches, each acked). A run's figure is the rate the consumer sees: (messages - 1) / (time of the last
// distinct message id - time of the first), so process start-up and connecting are outside it
// for every side alike. Each run also gives the CPU time each side spent per message: the hub's
// or Mosquitto's (from /proc) over the consumer's first-to-last window, a Node process's from
// when it was connected to its end, the Rust sender's for its whole process (/usr/bin/time);
// with two busy cores for three processes, their sum is what bounds a run. Prints figures and
// ratios; writes node.json and node.md to --out (default docs/benchmarks). Goals (issue 11):
// hubmsg Node >= 3x mqtt.js and >= 50 % of Rust.
//
//   cargo build --release -p hubmsg-cli
//   (cd bindings/node/bench && npm install)
//   node bindings/node/bench/bench_d2c.mjs            # ~1 minute; --quick: 10,000 messages per run
//   node bindings/node/bench/bench_d2c.mjs --parts    # each side alone with its CPU time
//                                                     # (node-parts.json / node-parts.md)
import { spawn } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createConnection, createServer } from 'node:net'
import { cpus, loadavg, tmpdir, platform, release } from 'node:os'
import { join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'

const ME = fileURLToPath(import.meta.url)
const ROOT = resolve(ME, '../../../..')
const BODY = Buffer.alloc(256, 'x')
const GOAL_MQTTJS = 3.0
const GOAL_RUST = 0.5
const now = () => (performance.timeOrigin + performance.now()) / 1000 // seconds since the epoch, sub-ms

// ---------------------------------------------------------------------------------------------
// Child roles (this script runs itself in subprocesses)

/**
 * The distinct messages a consumer saw, by the number each sender gives its messages (0..n-1):
 * one bit each, so counting costs every consumer the same few instructions (a Set of id strings
 * cost ~0.8 µs per message, as much as some of what is measured).
 */
class Distinct {
  constructor(n) {
    this.bits = new Uint8Array(n)
    this.size = 0
  }

  add(i) {
    if (i >= 0 && i < this.bits.length && !this.bits[i]) {
      this.bits[i] = 1
      this.size++
    }
  }
}

/** The number in the first 16 bytes of an mqtt.js run's payload (zero-padded decimal). */
function payloadNumber(payload) {
  let v = 0
  for (let k = 0; k < 16; k++) v = v * 10 + (payload[k] - 48)
  return v
}

/**
 * The acknowledging consumer: `for await` over the events (which pulls them in batches), or
 * with `--parts` also `await stream.next()` one event per Promise, the way it read before.
 */
async function roleConsume(cs, n, prefix, mode = 'iter', group = '$Default') {
  const { ServiceClient } = await import('hubmsg')
  const svc = await ServiceClient.fromConnectionString(cs)
  const stream = await svc.events(group, { from: 'earliest' })
  let ev = await stream.next(500) // connected and subscribed once this returns
  console.log('ready')
  const cpu0 = process.cpuUsage()
  const seen = new Distinct(n)
  const take = (e) => {
    const mid = e.messageId
    e.ack()
    if (mid?.startsWith(prefix)) {
      if (!seen.size) console.log(`first ${now()}`)
      seen.add(Number(mid.slice(prefix.length)))
    }
    return seen.size >= n
  }
  if (!ev || !take(ev)) {
    if (mode === 'next') {
      for (;;) {
        ev = await stream.next(300_000)
        if (!ev) throw new Error('no event for 300 s')
        if (take(ev)) break
      }
    } else {
      let done = false
      const idle = setTimeout(() => { console.error('no event for 300 s'); process.exit(1) }, 300_000)
      for await (const e of stream) {
        idle.refresh()
        if (take(e)) { done = true; break }
      }
      clearTimeout(idle)
      if (!done) throw new Error('the event stream ended early')
    }
  }
  console.log(`last ${now()}`)
  const cpu = process.cpuUsage(cpu0)
  console.log(`cpu ${(cpu.user + cpu.system) / 1e6}`)
  await stream.close()
  await svc.close()
}

async function roleSend(mode, cs, outbox, n, prefix) {
  const { DeviceClient } = await import('hubmsg')
  const dev = await DeviceClient.fromConnectionString(cs, { outboxDir: outbox })
  const batch = 1000
  const cpu0 = process.cpuUsage() // connected: what follows is the sending
  console.log(`start ${now()}`)
  let previous = null // sendMany2: the previous batch, still becoming durable while the next one is built
  for (let lo = 0; lo < n; lo += batch) {
    const ids = Array.from({ length: Math.min(n, lo + batch) - lo }, (_, k) => `${prefix}${lo + k}`)
    if (mode === 'sendMany') await dev.sendMany(ids.map((messageId) => ({ body: BODY, messageId })))
    else if (mode === 'sendMany2') {
      const current = dev.sendMany(ids.map((messageId) => ({ body: BODY, messageId })))
      if (previous) await previous
      previous = current
    } else await Promise.all(ids.map((messageId) => dev.send(BODY, { messageId }))) // 1,000 outstanding
  }
  if (previous) await previous
  console.log(`queued ${now()}`)
  await dev.flush(300_000)
  console.log(`flushed ${now()}`)
  const cpu = process.cpuUsage(cpu0)
  console.log(`cpu ${(cpu.user + cpu.system) / 1e6}`)
  await dev.close()
}

async function roleMqttSub(port, n) {
  const { connectAsync } = await import('mqtt')
  const c = await connectAsync(`mqtt://127.0.0.1:${port}`, { clientId: 'bench-sub', clean: false, keepalive: 30, protocolVersion: 4 })
  const got = new Distinct(n)
  let first = 0
  const done = new Promise((resolveDone) => {
    c.on('message', (_topic, payload) => {
      if (!got.size) first = now()
      got.add(payloadNumber(payload))
      if (got.size >= n) resolveDone(now())
    })
  })
  await c.subscribeAsync('bench/#', { qos: 1 })
  const cpu0 = process.cpuUsage()
  console.log('ready') // SUBACK: publishing may start
  const last = await done
  console.log(`first ${first}`)
  console.log(`last ${last}`)
  const cpu = process.cpuUsage(cpu0)
  console.log(`cpu ${(cpu.user + cpu.system) / 1e6}`)
  await c.endAsync()
}

async function roleMqttPub(port, n) {
  const { connectAsync } = await import('mqtt')
  const c = await connectAsync(`mqtt://127.0.0.1:${port}`, { clientId: 'bench-pub', clean: false, keepalive: 30, protocolVersion: 4 })
  const cpu0 = process.cpuUsage()
  console.log(`start ${now()}`)
  // MQTT packet ids are 16 bits: keep 10,000 QoS 1 publishes outstanding, waiting for the oldest
  // beyond that.
  const window = []
  for (let i = 0; i < n; i++) {
    if (window.length >= 10_000) await window.shift()
    const payload = Buffer.concat([Buffer.from(String(i).padStart(16, '0')), BODY.subarray(16)])
    window.push(c.publishAsync('bench/d', payload, { qos: 1 }))
  }
  console.log(`queued ${now()}`)
  await Promise.all(window)
  const cpu = process.cpuUsage(cpu0)
  console.log(`cpu ${(cpu.user + cpu.system) / 1e6}`)
  await c.endAsync()
}

// ---------------------------------------------------------------------------------------------
// The runs

/** A child process whose stdout lines are `word value`; every wait is bounded. */
class Proc {
  constructor(cmd, args, name) {
    this.name = name
    this.values = new Map()
    this.waiters = []
    this.stderr = ''
    this.p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] })
    this.p.stderr.on('data', (d) => { this.stderr += d })
    this.exit = new Promise((r) => this.p.on('exit', (code, signal) => { this.code = code ?? signal; this.wake(); r(this.code) }))
    createInterface({ input: this.p.stdout }).on('line', (l) => {
      const [k, ...v] = l.trim().split(' ')
      this.values.set(k, v.join(' '))
      this.wake()
    })
  }

  wake() {
    for (const w of this.waiters.splice(0)) w()
  }

  async waitFor(word, timeoutS = 300) {
    const deadline = Date.now() + timeoutS * 1000
    while (!this.values.has(word)) {
      if (this.code !== undefined) throw new Error(`${this.name} ended (${this.code}) before '${word}': ${this.stderr.slice(-2000)}`)
      const left = deadline - Date.now()
      if (left <= 0) {
        this.p.kill('SIGKILL')
        throw new Error(`${this.name}: no '${word}' within ${timeoutS} s`)
      }
      await new Promise((r) => {
        const t = setTimeout(r, left)
        this.waiters.push(() => { clearTimeout(t); r() })
      })
    }
    return this.values.get(word)
  }

  async finish(timeoutS = 300) {
    const t = setTimeout(() => this.p.kill('SIGKILL'), timeoutS * 1000)
    const code = await this.exit
    clearTimeout(t)
    if (code !== 0) throw new Error(`${this.name} exited ${code}: ${this.stderr.slice(-2000)}`)
  }
}

const me = (name, ...args) => new Proc(process.execPath, [ME, name, ...args.map(String)], name)

/** CPU seconds (user + system) a live process has used so far, from /proc (10 ms resolution). */
function procCpu(pid) {
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')
    return (Number(f[11]) + Number(f[12])) / 100
  } catch {
    return NaN
  }
}

function freePort() {
  return new Promise((res, rej) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => res(port))
    })
    s.on('error', rej)
  })
}

/** A `hubmsg hub` process in a fresh data directory; resolves with it and its owner cs. */
async function startHub(binary, data) {
  const port = await freePort()
  const p = spawn(binary, ['hub', '--data', data, '--mqtt', `127.0.0.1:${port}`], { stdio: ['ignore', 'pipe', 'ignore'] })
  const cs = await new Promise((res, rej) => {
    p.on('exit', (code) => rej(new Error(`hubmsg hub exited (${code}) before it was ready`)))
    createInterface({ input: p.stdout }).on('line', (l) => {
      const m = /^HUBMSG_HUB_CONNECTION_STRING_FILE=(.*)$/.exec(l)
      if (m) res(readFileSync(m[1], 'utf8').trim())
    })
  })
  p.removeAllListeners('exit')
  return {
    cs,
    cpu: () => procCpu(p.pid),
    async device(id) {
      const { ServiceClient } = await import('hubmsg')
      const svc = await ServiceClient.fromConnectionString(cs)
      await svc.createDevice(id)
      const dcs = await svc.deviceConnectionString(id)
      await svc.close()
      return dcs
    },
    async stop() {
      const exited = new Promise((r) => p.on('exit', r))
      p.kill('SIGTERM')
      const t = setTimeout(() => p.kill('SIGKILL'), 10_000)
      await exited
      clearTimeout(t)
    },
  }
}

/** A run's CPU per message, sender / broker or hub / consumer. */
function cpuText(r) {
  const c = r.cpu_us_per_msg
  return `cpu µs/msg: sender ${c.sender.toFixed(1)} + hub ${c.hub.toFixed(1)} + consumer ${c.consumer.toFixed(1)} = ${c.total.toFixed(1)}`
}

function figure(label, n, first, last) {
  const secs = Math.max(last - first, 1e-6)
  return { label, messages: n, seconds: Number(secs.toFixed(3)), msgs_per_sec: Math.round((n - 1) / secs) }
}

async function hubmsgRun(binary, work, label, n, sender) {
  const data = join(work, sender)
  const hub = await startHub(binary, join(data, 'hub'))
  try {
    const cs = await hub.device('bench-1')
    const prefix = `${sender}-`
    const consumer = me('_consume', hub.cs, n, prefix)
    await consumer.waitFor('ready')
    const hubCpu0 = hub.cpu()
    const s = sender === 'rust'
      ? new Proc('/usr/bin/time', ['-f', 'rusage %U %S %e', binary, 'device', 'send', '--connection-string', cs, '--data', BODY.toString(), '--count', String(n),
        '--outbox', join(data, 'outbox'), '--message-id-prefix', prefix, '--batch', '1000', '--flush-timeout-secs', '300'], 'hubmsg device send')
      : me('_send', sender, cs, join(data, 'outbox'), n, prefix)
    const first = Number(await consumer.waitFor('first'))
    const last = Number(await consumer.waitFor('last'))
    const hubCpu = hub.cpu() - hubCpu0
    await s.finish()
    await consumer.finish()
    const senderCpu = sender === 'rust' ? rusage(s.stderr).cpu : Number(s.values.get('cpu'))
    return { ...figure(label, n, first, last), cpu_us_per_msg: perMsg(n, { sender: senderCpu, hub: hubCpu, consumer: Number(consumer.values.get('cpu')) }) }
  } finally {
    await hub.stop()
  }
}

function findMosquitto() {
  for (const p of ['/usr/sbin/mosquitto', '/usr/local/sbin/mosquitto', '/usr/bin/mosquitto']) if (existsSync(p)) return p
  return null
}

async function ensureMosquitto() {
  const found = findMosquitto()
  if (found) return [found, '']
  if (process.getuid?.() !== 0 || !existsSync('/usr/bin/apt-get')) return [null, 'mosquitto is not installed (apt-get install mosquitto)']
  console.log('  installing mosquitto: apt-get update && apt-get install -y mosquitto')
  for (const args of [['update', '-q'], ['install', '-y', '-q', 'mosquitto']]) {
    const p = spawn('apt-get', args, { stdio: 'ignore', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } })
    const code = await new Promise((r) => p.on('exit', r))
    if (code !== 0) return [null, `apt-get ${args.join(' ')} failed (${code})`]
  }
  return [findMosquitto(), '']
}

async function listening(port, timeoutMs) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const ok = await new Promise((r) => {
      const s = createConnection({ host: '127.0.0.1', port }, () => { s.destroy(); r(true) })
      s.on('error', () => r(false))
    })
    if (ok) return
    if (Date.now() > deadline) throw new Error(`mosquitto did not listen within ${timeoutMs} ms`)
    await new Promise((r) => setTimeout(r, 20)) // polling a port that has no event to await
  }
}

async function mqttjsRun(mosquitto, work, n) {
  const d = join(work, 'mosquitto')
  mkdirSync(d, { recursive: true })
  const port = await freePort()
  const conf = join(d, 'mosquitto.conf')
  writeFileSync(conf, `listener ${port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location ${d}/\n` +
    'max_inflight_messages 1000\nmax_queued_messages 0\nlog_dest stderr\nlog_type error\n' + (process.getuid?.() === 0 ? 'user root\n' : ''))
  const broker = spawn(mosquitto, ['-c', conf], { stdio: 'ignore' })
  try {
    await listening(port, 10_000)
    const sub = me('_mqtt_sub', port, n)
    await sub.waitFor('ready')
    const brokerCpu0 = procCpu(broker.pid)
    const pub = me('_mqtt_pub', port, n)
    await pub.waitFor('start')
    const first = Number(await sub.waitFor('first'))
    const last = Number(await sub.waitFor('last'))
    const brokerCpu = procCpu(broker.pid) - brokerCpu0
    await pub.finish()
    await sub.finish()
    const cpu = perMsg(n, { sender: Number(pub.values.get('cpu')), hub: brokerCpu, consumer: Number(sub.values.get('cpu')) })
    const version = JSON.parse(readFileSync(join(ROOT, 'bindings/node/bench/node_modules/mqtt/package.json'), 'utf8')).version
    return { ...figure('mqtt.js -> Mosquitto', n, first, last), cpu_us_per_msg: cpu, mqttjs: version }
  } finally {
    const exited = new Promise((r) => broker.on('exit', r))
    broker.kill('SIGTERM')
    await exited
  }
}

/** The CPU seconds (user + system) and wall seconds `/usr/bin/time -f 'rusage %U %S %e'` wrote to `stderr`. */
function rusage(stderr) {
  const m = / *rusage ([\d.]+) ([\d.]+) ([\d.]+)/.exec(stderr.split('\n').filter((l) => l.includes('rusage')).pop() || '')
  return m ? { cpu: Number(m[1]) + Number(m[2]), wall: Number(m[3]) } : { cpu: NaN, wall: NaN }
}

/** A command under /usr/bin/time: resolves to its CPU seconds (user + system) and wall seconds. */
async function timed(cmd, args, name) {
  const p = new Proc('/usr/bin/time', ['-f', 'rusage %U %S %e', cmd, ...args], name)
  await p.finish()
  return rusage(p.stderr)
}

/** CPU seconds per side as microseconds per message, and their sum. */
function perMsg(n, sides) {
  const out = {}
  for (const [k, v] of Object.entries(sides)) out[k] = Number((1e6 * v / n).toFixed(2))
  out.total = Number(Object.values(out).reduce((a, b) => a + b, 0).toFixed(2))
  return out
}

/**
 * `--parts`: each side alone, with its CPU time. (1) A hub pre-filled by the Rust client, then
 * drained by: the Node consumer one `await next()` per event, the Node consumer `for await`
 * (batched), and `hubmsg monitor-events` (Rust), each in a group of its own. (2) The Node
 * sender (sendMany of 1,000) into a hub, with `hubmsg monitor-events` as the consumer.
 */
async function parts(binary, work, n) {
  const rows = []
  const row = (label, count, secs, cpu) => {
    const r = { label, messages: count, seconds: Number(secs.toFixed(3)), msgs_per_sec: Math.round(count / secs), cpu_seconds: Number(cpu.toFixed(2)) }
    rows.push(r)
    console.log(`  ${label.padEnd(60)} ${r.msgs_per_sec.toLocaleString('en').padStart(9)} msg/s  cpu ${r.cpu_seconds.toFixed(2)} s (${(100 * cpu / secs).toFixed(0)} % of a core)`)
  }
  const hub = await startHub(binary, join(work, 'parts', 'hub'))
  try {
    const cs = await hub.device('bench-1')
    const fill = new Proc(binary, ['device', 'send', '--connection-string', cs, '--data', BODY.toString(), '--count', String(n),
      '--outbox', join(work, 'parts', 'outbox'), '--message-id-prefix', 'fill-', '--batch', '1000', '--flush-timeout-secs', '300'], 'fill')
    await fill.finish()
    for (const mode of ['next', 'iter']) {
      const c = me('_consume', hub.cs, n, 'fill-', mode, `drain-${mode}`)
      const first = Number(await c.waitFor('first'))
      const last = Number(await c.waitFor('last'))
      const cpu = Number(await c.waitFor('cpu'))
      await c.finish()
      row(`Node consumer drains ${n} stored, ${mode === 'next' ? 'await stream.next() per event' : 'for await (batched nextBatch)'}`, n, last - first, cpu)
    }
    const t = await timed(binary, ['monitor-events', '--hub-connection-string', hub.cs, '--consumer-group', 'drain-rust', '--from', 'earliest', '--count', String(n)], 'monitor-events')
    row(`Rust hubmsg monitor-events drains ${n} stored (incl. start-up)`, n, t.wall, t.cpu)
  } finally {
    await hub.stop()
  }
  const hub2 = await startHub(binary, join(work, 'parts', 'hub2'))
  try {
    const cs = await hub2.device('bench-1')
    const mon = new Proc('/usr/bin/time', ['-f', 'rusage %U %S %e', binary, 'monitor-events', '--hub-connection-string', hub2.cs, '--from', 'latest', '--count', String(n)], 'monitor-events')
    await new Promise((r) => setTimeout(r, 1000)) // monitor-events prints nothing when it is subscribed: give it a second
    const s = me('_send', 'sendMany', cs, join(work, 'parts', 'outbox2'), n, 'send-')
    const start = Number(await s.waitFor('start'))
    const flushed = Number(await s.waitFor('flushed'))
    const cpu = Number(await s.waitFor('cpu'))
    await s.finish()
    await mon.finish()
    row(`Node sender sendMany(1000) to a Rust consumer, start to flushed`, n, flushed - start, cpu)
    console.log(`    (its consumer, hubmsg monitor-events: cpu ${rusage(mon.stderr).cpu.toFixed(2)} s)`)
  } finally {
    await hub2.stop()
  }
  return rows
}

async function main() {
  const argv = process.argv.slice(2)
  const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt }
  const quick = argv.includes('--quick')
  const n = quick ? 10_000 : Number(opt('--messages', 100_000))
  if (argv.includes('--parts')) {
    const binary = resolve(opt('--hubmsg', join(ROOT, 'target/release/hubmsg')))
    const out = resolve(opt('--out', join(ROOT, 'docs/benchmarks')))
    const work = mkdtempSync(join(tmpdir(), 'hubmsg-nodebench-'))
    const load = [loadavg()[0]]
    let rows
    try {
      console.log(`each side alone, ${BODY.length} B, fsync'd; ${n} messages; load average ${load[0].toFixed(2)}`)
      rows = await parts(binary, work, n)
    } finally {
      rmSync(work, { recursive: true, force: true })
    }
    load.push(loadavg()[0])
    const machine = { cpus: cpus().length, platform: `${platform()} ${release()}`, node: process.version, load_average_1min: load.map((l) => Number(l.toFixed(2))) }
    mkdirSync(out, { recursive: true })
    writeFileSync(join(out, 'node-parts.json'), JSON.stringify({ machine, rows }, null, 2) + '\n')
    writeFileSync(join(out, 'node-parts.md'), `# Node D2C benchmark: each side alone

Written by \`node bindings/node/bench/bench_d2c.mjs --parts\` (see its header). Machine: ${machine.cpus} CPUs,
${machine.platform}, Node ${machine.node}; load average (1 min) ${load.map((l) => l.toFixed(2)).join(' before, ')} after.
${BODY.length} B bodies, fsync'd. A consumer's figure is (messages) / (its last event - its first); \`hubmsg
monitor-events\` is timed from its start (it prints no first-event time); the sender's is
start to \`flush()\` done. CPU is the process's user + system time over that window.

| side | messages | seconds | msg/s | CPU s |
|---|---|---|---|---|
${rows.map((r) => `| ${r.label} | ${r.messages.toLocaleString('en')} | ${r.seconds.toFixed(2)} | ${r.msgs_per_sec.toLocaleString('en')} | ${r.cpu_seconds.toFixed(2)} |`).join('\n')}
`)
    console.log(`wrote ${join(out, 'node-parts.json')} and ${join(out, 'node-parts.md')}`)
    return 0
  }
  const out = resolve(opt('--out', join(ROOT, 'docs/benchmarks')))
  const binary = resolve(opt('--hubmsg', join(ROOT, 'target/release/hubmsg')))
  if (!existsSync(binary)) {
    console.error(`${binary} is missing: cargo build --release -p hubmsg-cli`)
    return 2
  }
  const { version } = await import('hubmsg')
  const work = mkdtempSync(join(tmpdir(), 'hubmsg-nodebench-'))
  const load = [loadavg()[0]]
  const runs = []
  let unavailable = ''
  try {
    console.log(`D2C, 1 device, ${BODY.length} B, QoS 1, fsync'd; ${n} messages per run`)
    for (const [label, sender] of [
      ['hubmsg Node sendMany (batches of 1000)', 'sendMany'],
      ['hubmsg Node sendMany (batches of 1000, 2 outstanding)', 'sendMany2'],
      ['hubmsg Node send() (1000 Promises outstanding)', 'send'],
      ['hubmsg Rust client (hubmsg device send --batch 1000)', 'rust'],
    ]) {
      const r = await hubmsgRun(binary, work, label, n, sender)
      runs.push(r)
      console.log(`  ${label.padEnd(56)} ${r.msgs_per_sec.toLocaleString('en').padStart(9)} msg/s  (${n} in ${r.seconds.toFixed(2)} s)  ${cpuText(r)}`)
    }
    const [mosquitto, why] = await ensureMosquitto()
    unavailable = why
    if (mosquitto) {
      const r = await mqttjsRun(mosquitto, work, n)
      runs.push(r)
      console.log(`  ${`${r.label} (mqtt.js ${r.mqttjs})`.padEnd(56)} ${r.msgs_per_sec.toLocaleString('en').padStart(9)} msg/s  (${n} in ${r.seconds.toFixed(2)} s)  ${cpuText(r)}`)
    } else {
      console.log(`  mqtt.js -> Mosquitto: unavailable: ${unavailable}`)
    }
  } finally {
    rmSync(work, { recursive: true, force: true })
  }
  load.push(loadavg()[0])
  const best = Math.max(runs[0].msgs_per_sec, runs[1].msgs_per_sec, runs[2].msgs_per_sec)
  const rust = runs[3].msgs_per_sec
  const mqttjs = runs[4]?.msgs_per_sec
  const ratios = { node_best_vs_rust: Number((best / rust).toFixed(2)), node_best_vs_mqttjs: mqttjs ? Number((best / mqttjs).toFixed(2)) : null }
  console.log(`hubmsg Node (best) / Rust client: ${ratios.node_best_vs_rust.toFixed(2)}x (goal >= ${GOAL_RUST.toFixed(2)}x)`)
  if (mqttjs) console.log(`hubmsg Node (best) / mqtt.js:     ${ratios.node_best_vs_mqttjs.toFixed(2)}x (goal >= ${GOAL_MQTTJS.toFixed(1)}x)`)
  const result = {
    machine: { cpus: cpus().length, platform: `${platform()} ${release()}`, node: process.version, load_average_1min: load.map((l) => Number(l.toFixed(2))) },
    hubmsg: version(),
    body_bytes: BODY.length,
    qos: 1,
    durability: "always (device outbox and hub log fdatasync'd)",
    method: "each sender and consumer is its own process; figure = (messages - 1) / (consumer's last distinct id - its first)",
    runs,
    ratios,
    goals: { node_vs_mqttjs: GOAL_MQTTJS, node_vs_rust: GOAL_RUST },
    mqttjs_unavailable: unavailable || null,
  }
  mkdirSync(out, { recursive: true })
  writeFileSync(join(out, 'node.json'), JSON.stringify(result, null, 2) + '\n')
  writeMd(join(out, 'node.md'), result)
  console.log(`wrote ${join(out, 'node.json')} and ${join(out, 'node.md')}`)
  return 0
}

function writeMd(path, r) {
  const cpu = (x) => { const c = x.cpu_us_per_msg; return `${c.sender.toFixed(1)} + ${c.hub.toFixed(1)} + ${c.consumer.toFixed(1)} = ${c.total.toFixed(1)}` }
  const rows = r.runs.map((x) => `| ${x.label}${x.mqttjs ? ` (mqtt.js ${x.mqttjs})` : ''} | ${x.messages.toLocaleString('en')} | ${x.seconds.toFixed(2)} | ${x.msgs_per_sec.toLocaleString('en')} | ${cpu(x)} |`).join('\n')
  const mq = r.ratios.node_best_vs_mqttjs
    ? `| hubmsg Node (best) / mqtt.js | ${r.ratios.node_best_vs_mqttjs.toFixed(2)}x | >= ${GOAL_MQTTJS.toFixed(1)}x |`
    : `| hubmsg Node / mqtt.js | unavailable: ${r.mqttjs_unavailable} | >= ${GOAL_MQTTJS.toFixed(1)}x |`
  writeFileSync(path, `# Node D2C benchmark

Written by \`node bindings/node/bench/bench_d2c.mjs\` (method: the header of that script and
[README.md](README.md#node)). Machine: ${r.machine.cpus} CPUs, ${r.machine.platform}, Node
${r.machine.node}; hubmsg ${r.hubmsg}; load average (1 min) ${r.machine.load_average_1min.join(' before, ')} after (other
work shares the machine: the ratios, measured in one run, are what to read).

One device, ${r.body_bytes} B bodies, QoS 1, durability ${r.durability}; each sender and
consumer is its own process; figure = (messages - 1) / (the time the consumer saw the last
distinct message id - the time it saw the first).

| run | messages | seconds | msg/s | CPU µs per message: sender + hub (Mosquitto) + consumer |
|---|---|---|---|---|
${rows}

| ratio | value | goal |
|---|---|---|
| hubmsg Node (best) / Rust client | ${r.ratios.node_best_vs_rust.toFixed(2)}x | >= ${GOAL_RUST.toFixed(2)}x |
${mq}

The consumer of the hubmsg runs reads with \`for await\` (batched pulls, docs/node.md); each side
measured alone, with its CPU time: [node-parts.md](node-parts.md) (\`--parts\`).
`)
}

const [role, ...rest] = process.argv.slice(2)
if (role === '_consume') await roleConsume(rest[0], Number(rest[1]), rest[2], rest[3], rest[4])
else if (role === '_send') await roleSend(rest[0], rest[1], rest[2], Number(rest[3]), rest[4])
else if (role === '_mqtt_sub') await roleMqttSub(Number(rest[0]), Number(rest[1]))
else if (role === '_mqtt_pub') await roleMqttPub(Number(rest[0]), Number(rest[1]))
else process.exitCode = await main()
