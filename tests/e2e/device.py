"""The Python device of the four-language end-to-end test (tests/e2e/run.mjs drives it); the
same protocol as device.c: environment HUBMSG_DEVICE_CONNECTION_STRING, E2E_OUTBOX, E2E_COUNT,
E2E_PREFIX; prints {"half":true}, waits for "go", prints {"sent":N}, waits for "stop", prints
{"done":…}; settles every C2D command as its body says and prints {"c2d":ID,"action":…}."""

from __future__ import annotations

import json
import os
import sys
import threading

import hubmsg

_out = threading.Lock()


def line(obj: dict[str, object]) -> None:
    with _out:
        print(json.dumps(obj), flush=True)


def wait_for(word: str) -> None:
    for text in sys.stdin:
        if text.strip() == word:
            return


def commands(dev: hubmsg.DeviceClient) -> None:
    for cmd in dev.messages():  # ends when the client closes
        action = cmd.body.decode()
        try:
            if action == "complete":
                cmd.complete()
            elif action == "reject":
                cmd.reject()
            else:
                cmd.abandon()
        except hubmsg.HubmsgError as e:  # the connection dropped meanwhile: the hub redelivers
            print(f"settle {cmd.message_id}: {e}", file=sys.stderr)
        line({"c2d": cmd.message_id, "action": action, "seq": cmd.sequence_number})


def main() -> int:
    prefix = os.environ["E2E_PREFIX"]
    count = int(os.environ["E2E_COUNT"])
    dev = hubmsg.DeviceClient.from_connection_string(
        os.environ["HUBMSG_DEVICE_CONNECTION_STRING"],
        outbox_dir=os.environ["E2E_OUTBOX"],
        retry=hubmsg.RetryPolicy(initial_delay=0.05, max_delay=0.5, jitter=0.05),
    )
    receiver = threading.Thread(target=commands, args=(dev,), daemon=True)
    receiver.start()

    def send(lo: int, hi: int) -> None:
        for i in range(lo, hi):  # each send returns once durable in the outbox
            dev.send(json.dumps({"lang": "python", "seq": i}), message_id=f"{prefix}-{i}", properties={"lang": "python"})

    send(0, count // 2)
    line({"half": True})
    wait_for("go")
    send(count // 2, count)
    line({"sent": count})
    wait_for("stop")
    flushed = True
    try:
        dev.flush(60)
    except hubmsg.HubmsgTimeoutError:
        flushed = False
    st = dev.stats()
    line({"done": True, "flushed": flushed, "delivered": st.delivered, "depth": st.depth, "connects": st.connects, "c2dDuplicates": st.c2d_duplicates})
    dev.close()
    receiver.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
