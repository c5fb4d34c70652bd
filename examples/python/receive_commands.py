"""receive_commands [count]: a device receives cloud-to-device commands with receive(timeout),
completes the ones it can execute and rejects the others, until `count` commands arrived
(default 5) or 30 s passed without one.

HUBMSG_DEVICE_CONNECTION_STRING: the device (else: demo mode, where an embedded hub and a
service send the commands with feedback "full" and the outcomes are printed at the end).
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from typing import Optional

import hubmsg
from example import Demo


def send_commands(svc: hubmsg.ServiceClient, count: int) -> None:
    for i in range(count):
        body = "self-destruct" if i % 4 == 3 else "open-valve"
        svc.send_c2d("valve-1", body, message_id=f"cmd-{i}", ack="full", ttl=60)


def print_feedback(svc: hubmsg.ServiceClient, count: int) -> None:
    seen = 0
    stream = svc.feedback()
    while seen < count:
        batch = stream.next(timeout=30)
        if batch is None:
            break
        for r in batch.records:
            print(f"feedback: {r.original_message_id} -> {r.description}")
            seen += 1
        batch.ack()


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    with ExitStack() as stack:
        cs = os.environ.get("HUBMSG_DEVICE_CONNECTION_STRING")
        svc: Optional[hubmsg.ServiceClient] = None
        if cs is None:
            hub = stack.enter_context(Demo()).start()
            cs = hub.create_device("valve-1")
            svc = stack.enter_context(hubmsg.ServiceClient.from_connection_string(hub.service_connection_string))
            send_commands(svc, count)
        dev = stack.enter_context(hubmsg.DeviceClient.from_connection_string(cs, in_memory=True))
        received = 0
        while received < count:
            cmd = dev.receive(timeout=30)
            if cmd is None:
                print("no command for 30 s; stopping")
                break
            known = cmd.body == b"open-valve"
            print(f"command {cmd.message_id}: {cmd.body.decode()} -> {'complete' if known else 'reject'}")
            if known:
                cmd.complete()
            else:
                cmd.reject()
            received += 1
        print(f"received {received} commands")
        if svc is not None:
            print_feedback(svc, received)
        return 0 if received == count else 1


if __name__ == "__main__":
    sys.exit(main())
