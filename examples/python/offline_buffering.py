"""offline_buffering [count]: the device keeps sending while the hub is down; its durable outbox
holds the messages, and once the hub is back they are all delivered — none lost.

1. start a hub (embedded, 127.0.0.1 port 0), register the device, stop the hub;
2. send `count` messages (default 100): each send returns once the message is durable locally;
3. start the hub again on the same address and data directory;
4. the device reconnects and delivers; a consumer checks every message id arrived.

Exit status 0 only when nothing was lost.
"""

from __future__ import annotations

import sys
import threading

import hubmsg
from example import Demo


def watch_status(dev: hubmsg.DeviceClient) -> threading.Thread:
    def run() -> None:
        last = ""
        for s in dev.status_changes():
            if s.status != last and s.status != "retrying":
                print(f"device: {s.status} {s.reason}")
            last = s.status

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    with Demo() as demo:
        cs = demo.start().create_device("field-unit-7")
        demo.stop_hub()  # the hub goes down
        print("hub stopped")
        dev = hubmsg.DeviceClient.from_connection_string(
            cs,
            outbox_dir=demo.path("outbox"),
            max_messages=100_000,
            max_bytes=64 << 20,
            overflow="reject",
            retry=hubmsg.RetryPolicy(initial_delay=0.05, max_delay=0.5, jitter=0.05),
        )
        watch_status(dev)
        for i in range(count):
            dev.send(f"offline-{i}", message_id=f"offline-{i}")  # durable in the outbox: safe
        st = dev.stats()
        print(f"queued {st.depth} messages while the hub was down (delivered so far: {st.delivered})")

        hub = demo.start()  # the hub is back, same address and data
        print(f"hub restarted on {hub.address}")
        dev.flush(120)
        retries = dev.stats().retries
        dev.close()

        # Check at the hub: every id arrived (duplicates are allowed: at-least-once).
        seen: set[int] = set()
        duplicates = 0
        with hubmsg.ServiceClient.from_connection_string(hub.service_connection_string) as svc:
            with svc.events("$Default", start="earliest") as stream:
                while len(seen) < count:
                    ev = stream.next(timeout=30)
                    if ev is None:
                        break
                    mid = ev.message_id or ""
                    if mid.startswith("offline-"):
                        n = int(mid[len("offline-") :])
                        duplicates += n in seen
                        seen.add(n)
                    ev.ack()
                stream.checkpoint()
        print(
            f"sent {count} while the hub was down, received {len(seen)} distinct, lost {count - len(seen)} "
            f"(duplicates {duplicates}, retries {retries})"
        )
        return 0 if len(seen) == count else 1


if __name__ == "__main__":
    sys.exit(main())
