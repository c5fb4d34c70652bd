"""send_telemetry [count]: a device sends `count` telemetry readings (default 10) with properties
and counts their outcomes, then waits until all are delivered.

HUBMSG_DEVICE_CONNECTION_STRING: the device to send as (else: demo mode with an embedded hub).
HUBMSG_OUTBOX_DIR: where the durable outbox lives (default: in the demo directory, or the
                   engine's default with a connection string).
HUBMSG_DURABILITY: always (default) | interval | never.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from typing import Optional

import hubmsg
from example import Demo


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with ExitStack() as stack:
        cs = os.environ.get("HUBMSG_DEVICE_CONNECTION_STRING")
        outbox: Optional[str] = os.environ.get("HUBMSG_OUTBOX_DIR")
        if cs is None:
            demo = stack.enter_context(Demo())
            cs = demo.start().create_device("sensor-1")
            outbox = outbox or str(demo.path("outbox"))
        dev = stack.enter_context(
            hubmsg.DeviceClient.from_connection_string(
                cs, outbox_dir=outbox, durability=os.environ.get("HUBMSG_DURABILITY", "always")
            )
        )
        deliveries = []
        for i in range(count):
            body = f'{{"temperature":{20.0 + (i % 50) / 10.0:.1f},"seq":{i}}}'
            d = dev.send(  # returns once durable in the outbox
                body,
                content_type="application/json",
                content_encoding="utf-8",
                properties={"unit": "celsius", "seq": str(i)},
            )
            deliveries.append(d)
        dev.flush(120)
        delivered = sum(1 for d in deliveries if d.outcome == "delivered")
        st = dev.stats()
        print(f"delivered {delivered} of {count} (outbox: {st.delivered} delivered, {st.depth} pending; {st.connects} connects)")
        return 0 if delivered == count else 1


if __name__ == "__main__":
    sys.exit(main())
