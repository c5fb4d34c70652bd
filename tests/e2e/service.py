"""The Python service of the four-language end-to-end test (tests/e2e/run.mjs drives it), one of
the two members of consumer group E2E_GROUP (the Node service, service.mjs, is the other; the
same rules). Environment: HUBMSG_SERVICE_CONNECTION_STRING, E2E_GROUP.

Per event (JSON lines on stdout): {"event":MESSAGE_ID,"device":…,"partition":…}; for every event
PREFIX-i with i % 10 == 0 it sends the device the command cmd-PREFIX-i whose body says how to
settle it (complete, reject, abandon in turn) with feedback "full": {"command":ID,"device":…,
"action":…} before the send, {"accepted":ID} once the hub holds it. Feedback records it receives:
{"feedback":ID,"status":…}. Stops on the stdin line "stop": {"done":true,"events":N}."""

from __future__ import annotations

import json
import os
import sys
import threading

import hubmsg

ACTIONS = ("complete", "reject", "abandon")
_out = threading.Lock()
stop = threading.Event()


def line(obj: dict[str, object]) -> None:
    with _out:
        print(json.dumps(obj), flush=True)


def command_for(message_id: str) -> tuple[str, str] | None:
    """The command an event asks for (id, action), if any (the same rule as service.mjs)."""
    prefix, _, n = message_id.rpartition("-")
    if not n.isdigit() or int(n) % 10:
        return None
    return f"cmd-{message_id}", ACTIONS[(int(n) // 10) % 3]


def wait_for_stop() -> None:
    for text in sys.stdin:
        if text.strip() == "stop":
            break
    stop.set()


def feedback(svc: hubmsg.ServiceClient) -> None:
    stream = svc.feedback()
    while not stop.is_set():
        try:
            batch = stream.next(timeout=0.5)
        except hubmsg.ClosedError:
            return
        if batch is None:
            continue
        for r in batch.records:
            line({"feedback": r.original_message_id, "status": r.status, "device": r.device_id})
        batch.ack()


def main() -> int:
    svc = hubmsg.ServiceClient.from_connection_string(os.environ["HUBMSG_SERVICE_CONNECTION_STRING"])
    threading.Thread(target=wait_for_stop, daemon=True).start()
    fb = threading.Thread(target=feedback, args=(svc,))
    fb.start()
    events = 0
    stream = svc.events(os.environ["E2E_GROUP"], start="earliest")
    line({"ready": True})
    while not stop.is_set():
        ev = stream.next(timeout=0.5)
        if ev is None:
            continue
        mid = ev.message_id or ""
        line({"event": mid, "device": ev.device_id, "partition": ev.partition})
        cmd = command_for(mid)
        if cmd is not None:
            cid, action = cmd
            line({"command": cid, "device": ev.device_id, "action": action})
            r = svc.send_c2d(ev.device_id, action, message_id=cid, ack="full", ttl=600)
            line({"accepted": r.message_id})
        ev.ack()
        events += 1
        if events % 100 == 0:
            try:
                stream.checkpoint()
            except hubmsg.HubmsgError as e:  # the hub is down: the next one persists it
                print(f"checkpoint: {e}", file=sys.stderr)
    stream.close()
    fb.join(10)
    line({"done": True, "events": events})
    svc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
