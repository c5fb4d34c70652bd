// The install-time build of the native addon (`npm install ./bindings/node` runs it): needs only
// cargo, not @napi-rs/cli (which a consumer's install does not get). It builds the crate
// hubmsg-node in release mode in the workspace's target/ and copies the library to
// hubmsg.linux-x64-gnu.node, the name native.js loads. Skipped when that file is newer than
// every Rust source of the workspace (HUBMSG_FORCE_BUILD=1 builds anyway).
import { spawnSync } from 'node:child_process'
import { copyFileSync, existsSync, mkdirSync, readdirSync, statSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
const pkg = resolve(here, '..')
const root = resolve(pkg, '../..')
const target = process.env.CARGO_TARGET_DIR ? resolve(process.env.CARGO_TARGET_DIR) : join(root, 'target')
const out = join(pkg, 'hubmsg.linux-x64-gnu.node')

if (process.platform !== 'linux' || process.arch !== 'x64') {
  console.error(`hubmsg: building on ${process.platform}-${process.arch} is not set up (linux-x64 only); the addon name native.js expects differs there`)
  process.exit(1)
}
if (!existsSync(join(root, 'Cargo.toml')) || !existsSync(join(root, 'core'))) {
  console.error(`hubmsg: ${root} is not a hubmsg checkout; the package builds from source and must be installed from one (npm install ./bindings/node)`)
  process.exit(1)
}

/** The newest modification time of the Rust sources and manifests the addon is built from. */
function newestSource() {
  let newest = 0
  const walk = (dir) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      if (e.name === 'target' || e.name === 'node_modules' || e.name.startsWith('.')) continue
      const p = join(dir, e.name)
      if (e.isDirectory()) walk(p)
      else if (/\.(rs|toml)$/.test(e.name) || e.name === 'Cargo.lock') newest = Math.max(newest, statSync(p).mtimeMs)
    }
  }
  for (const d of ['core', 'bindings/common', 'bindings/node']) walk(join(root, d))
  for (const f of ['Cargo.toml', 'Cargo.lock']) newest = Math.max(newest, statSync(join(root, f)).mtimeMs)
  return newest
}

if (!process.env.HUBMSG_FORCE_BUILD && existsSync(out) && statSync(out).mtimeMs > newestSource()) {
  console.log(`hubmsg: ${out} is up to date`)
  process.exit(0)
}
const cargo = process.env.CARGO || 'cargo'
console.log(`hubmsg: building the native addon (cargo build --release -p hubmsg-node; a cold build takes minutes)`)
// napi-derive writes the type definitions of the Rust source there (scripts/types.mjs reads them).
const typeDefDir = join(target, 'napi-type-def')
mkdirSync(typeDefDir, { recursive: true })
const env = { ...process.env, NAPI_TYPE_DEF_TMP_FOLDER: typeDefDir }
const r = spawnSync(cargo, ['build', '--release', '-p', 'hubmsg-node'], { cwd: root, stdio: 'inherit', env })
if (r.error) {
  console.error(`hubmsg: cannot run ${cargo}: ${r.error.message}. Install the Rust toolchain (cargo on PATH) and run npm install again`)
  process.exit(1)
}
if (r.status !== 0) process.exit(r.status ?? 1)
copyFileSync(join(target, 'release', 'libhubmsg_node.so'), out)
console.log(`hubmsg: built ${out}`)
