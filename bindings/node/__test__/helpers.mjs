// Shared by the tests: an embedded hub on 127.0.0.1 port 0 in a temporary directory, fresh
// device ids, and a bounded wait for a condition.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { Hub, ServiceClient } from '../index.js'

/** The package directory (what `import 'hubmsg'` resolves to in child processes). */
export const PKG = fileURLToPath(new URL('..', import.meta.url))
export const INDEX = join(PKG, 'index.js')

let ids = 0

/** A hub with feedback batched every 100 ms and C2D locks of 1 s (fast tests). */
export async function startHub(options = {}) {
  const root = mkdtempSync(join(tmpdir(), 'hubmsg-node-test-'))
  const hub = await Hub.start(join(root, 'hub'), { feedbackIntervalMs: 100, lockTimeoutMs: 1000, ...options })
  const service = await ServiceClient.fromConnectionString(hub.serviceConnectionString)
  return {
    hub,
    service,
    root,
    /** Registers a fresh device: [deviceId, connection string]. */
    async device(prefix = 'dev') {
      const id = `${prefix}-${process.pid}-${ids++}`
      return [id, await hub.createDevice(id)]
    },
    /** A path for an outbox directory. */
    outbox(name) {
      return join(root, 'outboxes', name)
    },
    async stop() {
      await service.close()
      await hub.shutdown()
      rmSync(root, { recursive: true, force: true })
    },
  }
}

/** Waits until `cond()` is true, polling every 10 ms, at most `ms`; false on timeout. */
export async function until(cond, ms = 10_000) {
  const deadline = Date.now() + ms
  while (Date.now() < deadline) {
    if (await cond()) return true
    await new Promise((r) => setTimeout(r, 10))
  }
  return Boolean(await cond())
}

/** Reads events of `stream` (acking each) until `n` distinct message ids arrived or 30 s pass. */
export async function readIds(stream, n, timeoutMs = 30_000) {
  const seen = new Map()
  const deadline = Date.now() + timeoutMs
  while (seen.size < n && Date.now() < deadline) {
    const ev = await stream.next(Math.max(1, deadline - Date.now()))
    if (ev === null) break
    if (!seen.has(ev.messageId)) seen.set(ev.messageId, ev)
    ev.ack()
  }
  return seen
}

/** Runs `node --input-type=module -e code args…` with `hubmsg` importable; resolves to
 * { code, signal, stdout, stderr, ms }. Killed (SIGKILL) after `timeoutMs`. */
export function runNode(code, args = [], { timeoutMs = 60_000, env = {} } = {}) {
  return new Promise((resolve) => {
    const started = Date.now()
    const child = spawn(process.execPath, ['--input-type=module', '-e', code, ...args], {
      cwd: PKG, // so that `import 'hubmsg'` resolves to this package (self-reference)
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d) => (stdout += d))
    child.stderr.on('data', (d) => (stderr += d))
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
    child.on('exit', (code, signal) => {
      clearTimeout(timer)
      resolve({ code, signal, stdout, stderr, ms: Date.now() - started })
    })
  })
}
