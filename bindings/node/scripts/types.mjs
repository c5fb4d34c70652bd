// The TypeScript types (index.d.ts) and the loader (native.js) are generated from the Rust
// source by napi-rs and committed. This script regenerates them from the type definitions
// napi-derive writes while the addon compiles (scripts/build.mjs points it at
// target/napi-type-def), using @napi-rs/cli's own generator, so it needs no second build:
//   node scripts/types.mjs          exits 1 (with a diff) when a committed file drifted
//   node scripts/types.mjs --write  rewrites them (`npm run build`)
// When the type definitions are missing (the addon was built some other way), it rebuilds the
// addon once with them.
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
const pkgDir = resolve(here, '..')
const root = resolve(pkgDir, '../..')
const target = process.env.CARGO_TARGET_DIR ? resolve(process.env.CARGO_TARGET_DIR) : join(root, 'target')
const typeDefDir = join(target, 'napi-type-def')
const write = process.argv.includes('--write')

if (!existsSync(join(typeDefDir, 'hubmsg-node'))) {
  console.log('types: no type definitions in target/napi-type-def; rebuilding the addon with them')
  const r = spawnSync(process.execPath, [join(here, 'build.mjs')], {
    stdio: 'inherit',
    env: { ...process.env, HUBMSG_FORCE_BUILD: '1', NAPI_FORCE_BUILD_HUBMSG_NODE: String(Date.now()) },
  })
  if (r.status !== 0) process.exit(r.status ?? 1)
}

const { generateTypeDef, writeJsBinding } = await import('@napi-rs/cli')
const pkg = JSON.parse(readFileSync(join(pkgDir, 'package.json'), 'utf8'))
const { dts, exports } = await generateTypeDef({
  typeDefDir,
  configDtsHeaderFile: pkg.napi.dtsHeaderFile,
  constEnum: false,
  cwd: pkgDir,
  declareBindingTarget: true,
})
const out = mkdtempSync(join(tmpdir(), 'hubmsg-types-'))
await writeJsBinding({
  platform: true,
  binaryName: pkg.napi.binaryName,
  packageName: pkg.name,
  idents: exports,
  version: pkg.version,
  outputDir: out,
  jsBinding: 'native.js',
})
const generated = { 'index.d.ts': dts, 'native.js': readFileSync(join(out, 'native.js'), 'utf8') }
rmSync(out, { recursive: true, force: true })

let drifted = 0
for (const [name, text] of Object.entries(generated)) {
  const path = join(pkgDir, name)
  const committed = existsSync(path) ? readFileSync(path, 'utf8') : ''
  if (committed === text) continue
  if (write) {
    writeFileSync(path, text)
    console.log(`types: wrote ${name}`)
    continue
  }
  drifted++
  const a = committed.split('\n')
  const b = text.split('\n')
  const i = a.findIndex((line, n) => line !== b[n])
  console.log(`types: ${name} drifted from the Rust source (first difference at line ${i + 1}):`)
  console.log(`  committed: ${JSON.stringify(a[i])}\n  generated: ${JSON.stringify(b[i])}`)
}
if (drifted) {
  console.log('run `npm run build` in bindings/node and commit the result')
  process.exit(1)
}
console.log(write ? 'types: up to date' : 'types: index.d.ts and native.js match the Rust source')
