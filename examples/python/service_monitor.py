"""service_monitor [count]: a back-end service lists the registered devices, then reads D2C
telemetry from consumer group "monitor" (acknowledging each event and checkpointing at the end)
until `count` events arrived (default 20) or 30 s passed.

HUBMSG_SERVICE_CONNECTION_STRING: a policy connection string (else: demo mode, where an
embedded hub and a device produce the telemetry).
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack

import hubmsg
from example import Demo


def produce(cs: str, count: int) -> None:
    with hubmsg.DeviceClient.from_connection_string(cs, in_memory=True) as dev:
        dev.send_many([f"reading {i}" for i in range(count)])
        dev.flush(30)


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    with ExitStack() as stack:
        cs = os.environ.get("HUBMSG_SERVICE_CONNECTION_STRING")
        if cs is None:
            hub = stack.enter_context(Demo()).start()
            cs = hub.service_connection_string
            produce(hub.create_device("thermostat-1"), count)
        svc = stack.enter_context(hubmsg.ServiceClient.from_connection_string(cs))
        for d in svc.list_devices():
            print(f"device {d.device_id} ({d.status})")
        events = 0
        with svc.events("monitor", start="earliest") as stream:
            while events < count:
                ev = stream.next(timeout=30)
                if ev is None:
                    break
                print(f"[{ev.device_id} p{ev.partition} #{ev.sequence_number}] {ev.body.decode(errors='replace')}")
                ev.ack()
                events += 1
            stream.checkpoint()  # acknowledged events are not read again by "monitor"
        print(f"received {events} events")
        return 0 if events >= count else 1


if __name__ == "__main__":
    sys.exit(main())
