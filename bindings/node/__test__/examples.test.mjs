// The Node examples run as a reader would run them: no arguments (demo mode with an embedded
// hub in a temporary directory), and send_telemetry with a connection string. They import
// 'hubmsg' through examples/node/node_modules (`npm install` in examples/node links it).
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { startHub } from './helpers.mjs'

const EXAMPLES = fileURLToPath(new URL('../../../examples/node/', import.meta.url))

function run(name, args = [], env = {}) {
  const r = spawnSync(process.execPath, [`${name}.mjs`, ...args], { cwd: EXAMPLES, encoding: 'utf8', timeout: 180_000, env: { ...process.env, ...env } })
  return { code: r.status, stdout: r.stdout, stderr: r.stderr }
}

let h
before(async () => {
  assert.ok(existsSync(`${EXAMPLES}node_modules/hubmsg`), 'run `npm install` in examples/node first (it links the package)')
  h = await startHub()
})
after(async () => {
  await h.stop()
})

for (const [name, args, expect] of [
  ['send_telemetry', ['200'], 'delivered 200 of 200'],
  ['receive_commands', ['8'], 'received 8 commands'],
  ['service_monitor', ['30'], 'received 30 events'],
  ['offline_buffering', ['300'], 'lost 0'],
]) {
  test(`${name} in demo mode`, () => {
    const r = run(name, args)
    assert.equal(r.code, 0, r.stdout + r.stderr)
    assert.ok(r.stdout.includes(expect), r.stdout)
    assert.ok(r.stdout.includes('demo mode'), r.stdout)
  })
}

test('receive_commands prints the feedback of completed and rejected commands', () => {
  const r = run('receive_commands', ['4'])
  assert.equal(r.code, 0, r.stderr)
  assert.ok(r.stdout.includes('feedback: cmd-0 -> Success') && r.stdout.includes('feedback: cmd-3 -> Rejected'), r.stdout)
})

test('send_telemetry with a connection string', async () => {
  const [, cs] = await h.device('ext')
  const r = run('send_telemetry', ['25'], { HUBMSG_DEVICE_CONNECTION_STRING: cs, HUBMSG_OUTBOX_DIR: h.outbox('ext') })
  assert.equal(r.code, 0, r.stdout + r.stderr)
  assert.ok(r.stdout.includes('delivered 25 of 25'), r.stdout)
  assert.ok(!r.stdout.includes('demo mode'), r.stdout)
})
