// Shared by the Node examples: the "demo mode" that runs a hub inside the example's own process
// (in a temporary directory) when no connection string is given — the counterpart of
// examples/c/example.h and examples/python/example.py.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Hub } from 'hubmsg'

/** A temporary directory and an embedded hub in it on 127.0.0.1, port 0, with C2D feedback
 * batched every 200 ms (IoT Hub batches every 15 s). Call `close()` at the end. */
export class Demo {
  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), 'hubmsg-example-'))
    this.hub = null
  }

  /** Starts (or restarts) the hub on its data directory and address. */
  async start() {
    const listen = this.hub ? `127.0.0.1:${this.hub.port}` : '127.0.0.1:0'
    this.hub = await Hub.start(join(this.dir, 'hub'), { listen, feedbackIntervalMs: 200 })
    console.log(`demo mode: embedded hub on ${this.hub.address} (data in ${this.dir})`)
    return this.hub
  }

  /** Stops the hub (its data stays). */
  async stopHub() {
    if (this.hub) await this.hub.shutdown()
  }

  /** A path inside the demo directory. */
  path(name) {
    return join(this.dir, name)
  }

  /** Stops the hub and removes the directory. */
  async close() {
    await this.stopHub()
    rmSync(this.dir, { recursive: true, force: true })
  }
}
