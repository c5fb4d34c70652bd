"""D2C throughput from one Python device, in one run:

- hubmsg Python device -> `hubmsg hub` process -> an acknowledging consumer, 256 B bodies, QoS 1,
  the device outbox and the hub log fsync'd (durability "always"), the sender driven the ways a
  Python user sends fast: `send_many` batches, and many outstanding asyncio sends; blocking
  `send()` per message for reference (each send waits for its own fsync);
- (a) paho-mqtt 2.x QoS 1 publisher (in-flight window 1000, 10,000 messages outstanding) ->
  Mosquitto (Debian's package, persistence on) -> a paho QoS 1 subscriber: what a Python user
  has today;
- (b) the Rust client (`hubmsg device send`) -> the same kind of hub -> the same consumer.

Every sender and consumer is its own process (a device simulator and a back end are separate
programs), the consumer connected before the sender starts. A run's figure is the rate the
consumer sees: (messages - 1) / (time of the last distinct message id - time of the first), so
process start-up and connecting are outside it for every side alike. Prints figures and ratios, writes `python.json` and `python.md` to
--out (default docs/benchmarks). Goals (issue 9): hubmsg Python >= 3x paho and >= 50 % of Rust.

    cargo build --release -p hubmsg-cli
    pip install ./bindings/python -r bindings/python/bench/requirements.txt
    python bindings/python/bench/bench_d2c.py            # ~1 minute; --quick: ~15 s
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[3]
BODY = b"x" * 256
GOAL_PAHO = 3.0
GOAL_RUST = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Child roles (this script runs itself in subprocesses)


def role_consume(cs: str, n: int, prefix: str) -> None:
    """Reads $Default from the beginning, acks every event, prints the time the n-th distinct
    id with `prefix` arrived."""
    import hubmsg

    seen: set[str] = set()
    with hubmsg.ServiceClient.from_connection_string(cs) as svc, svc.events("$Default", start="earliest") as stream:
        first = stream.next(0.5)  # connected and subscribed once this returns
        print("ready", flush=True)
        for ev in stream if first is None else [first, *stream]:
            mid = ev.message_id
            ev.ack()
            if mid is not None and mid.startswith(prefix):
                if not seen:
                    print(f"first {time.time()}", flush=True)
                seen.add(mid)
                if len(seen) >= n:
                    break
        print(f"last {time.time()}", flush=True)


def role_send(mode: str, cs: str, outbox: str, n: int, prefix: str) -> None:
    """Sends n messages with the hubmsg Python client; prints the start time and when every
    send returned."""
    import hubmsg
    import hubmsg.aio

    batch = 1000
    if mode == "async":

        async def run() -> None:
            async with await hubmsg.aio.DeviceClient.from_connection_string(cs, outbox_dir=outbox) as dev:
                print(f"start {time.time()}", flush=True)
                for lo in range(0, n, batch):  # 1000 sends outstanding at a time
                    await asyncio.gather(*(dev.send(BODY, message_id=f"{prefix}{i}") for i in range(lo, min(n, lo + batch))))
                print(f"queued {time.time()}", flush=True)
                await dev.flush(300)

        asyncio.run(run())
        return
    with hubmsg.DeviceClient.from_connection_string(cs, outbox_dir=outbox) as dev:
        print(f"start {time.time()}", flush=True)
        if mode == "send_many":
            for lo in range(0, n, batch):
                dev.send_many([hubmsg.Message(BODY, message_id=f"{prefix}{i}") for i in range(lo, min(n, lo + batch))])
        else:
            for i in range(n):
                dev.send(BODY, message_id=f"{prefix}{i}")
        print(f"queued {time.time()}", flush=True)
        dev.flush(300)


def role_paho_sub(port: int, n: int) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: set[bytes] = set()
    done = first = time.time()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        nonlocal done, first
        if not got:
            first = time.time()
        got.add(msg.payload[:16])
        if len(got) >= n:
            done = time.time()
            client.disconnect()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sub", clean_session=False)
    c.max_inflight_messages_set(1000)
    c.on_message = on_message
    c.on_connect = lambda client, *a: client.subscribe("bench/#", qos=1)
    c.on_subscribe = lambda *a: print("ready", flush=True)  # SUBACK: publishing may start
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_forever()
    print(f"first {first}", flush=True)
    print(f"last {done}", flush=True)


def role_paho_pub(port: int, n: int) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub", clean_session=False)
    c.max_inflight_messages_set(1000)  # as the hubmsg device's in-flight window
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    print(f"start {time.time()}", flush=True)
    # paho's message ids are 16 bits, so at most 65,535 QoS 1 messages can be queued in the client:
    # keep 10,000 outstanding (10x its in-flight window), waiting for the oldest beyond that.
    window: collections.deque[Any] = collections.deque()
    for i in range(n):
        if len(window) >= 10_000:
            window.popleft().wait_for_publish(300)
        window.append(c.publish("bench/d", b"%016d" % i + BODY[16:], qos=1))
    print(f"queued {time.time()}", flush=True)
    for info in window:
        info.wait_for_publish(300)
    c.loop_stop()
    c.disconnect()


# ---------------------------------------------------------------------------------------------
# The runs


class Proc:
    """A child process whose stdout lines are `word value`, read by a thread so that every wait
    is bounded."""

    def __init__(self, args: list[str], env: Optional[dict[str, str]] = None) -> None:
        self.name = " ".join(args[2:4] if args[0] == sys.executable else args[1:3])
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[Optional[str]] = queue.Queue()
        self.values: dict[str, str] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, word: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while word not in self.values:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.p.kill()
                raise TimeoutError(f"{self.name}: no '{word}' within {timeout} s") from None
            if line is None:
                self.p.wait()
                err = self.p.stderr.read() if self.p.stderr else ""
                raise RuntimeError(f"{self.name} ended ({self.p.returncode}) before '{word}': {err[-2000:]}")
            k, _, v = line.strip().partition(" ")
            self.values[k] = v
        return self.values[word]

    def finish(self, timeout: float = 300) -> None:
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise
        if self.p.returncode != 0:
            err = self.p.stderr.read() if self.p.stderr else ""
            raise RuntimeError(f"{self.name} exited {self.p.returncode}: {err[-2000:]}")


def me(*args: object) -> list[str]:
    return [sys.executable, __file__, *map(str, args)]


class HubProcess:
    """A `hubmsg hub` process in a fresh data directory."""

    def __init__(self, binary: Path, data: Path) -> None:
        port = free_port()
        self.p = subprocess.Popen(
            [str(binary), "hub", "--data", str(data), "--mqtt", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.p.stdout is not None
        self.cs = ""
        for line in self.p.stdout:
            if line.startswith("HUBMSG_HUB_CONNECTION_STRING="):
                self.cs = line.strip().split("=", 1)[1]
                break
        if not self.cs:
            raise RuntimeError("hubmsg hub did not start")

    def device(self, device_id: str) -> str:
        import hubmsg

        with hubmsg.ServiceClient.from_connection_string(self.cs) as svc:
            svc.create_device(device_id)
            return svc.device_connection_string(device_id)

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()


def figure(label: str, n: int, first: float, last: float) -> dict[str, Any]:
    """The steady-state rate the consumer saw: n - 1 messages between the first and the last."""
    secs = max(last - first, 1e-6)
    return {"label": label, "messages": n, "seconds": round(secs, 3), "msgs_per_sec": round((n - 1) / secs)}


def hubmsg_run(binary: Path, work: Path, label: str, n: int, sender: str) -> dict[str, Any]:
    data = work / label
    hub = HubProcess(binary, data / "hub")
    try:
        cs = hub.device("bench-1")
        prefix = f"{label}-"
        consumer = Proc(me("_consume", hub.cs, n, prefix))
        consumer.wait_for("ready")
        if sender == "rust":
            s = Proc(
                [
                    str(binary), "device", "send", "--connection-string", cs, "--data", BODY.decode(), "--count", str(n),
                    "--outbox", str(data / "outbox"), "--message-id-prefix", prefix, "--batch", "1000",
                    "--flush-timeout-secs", "300",
                ]
            )  # fmt: skip
        else:
            s = Proc(me("_send", sender, cs, data / "outbox", n, prefix))
        first = float(consumer.wait_for("first"))
        last = float(consumer.wait_for("last"))
        s.finish()
        consumer.finish()
        return figure(label, n, first, last)
    finally:
        hub.stop()


def find_mosquitto() -> Optional[str]:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)


def ensure_mosquitto() -> tuple[Optional[str], str]:
    found = find_mosquitto()
    if found:
        return found, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "mosquitto is not installed (apt-get install mosquitto)"
    print("  installing mosquitto: apt-get update && apt-get install -y mosquitto", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "mosquitto"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            return None, f"{' '.join(cmd)} failed: {r.stderr[-300:]}"
    return find_mosquitto(), ""


def paho_run(mosquitto: str, work: Path, n: int) -> dict[str, Any]:
    import paho.mqtt

    d = work / "mosquitto"
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {d}/\n"
        "max_inflight_messages 1000\nmax_queued_messages 0\nlog_dest stderr\nlog_type error\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    broker = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not listen within 10 s") from None
                time.sleep(0.02)
        sub = Proc(me("_paho_sub", port, n))
        sub.wait_for("ready")
        pub = Proc(me("_paho_pub", port, n))
        pub.wait_for("start")
        first = float(sub.wait_for("first"))
        last = float(sub.wait_for("last"))
        pub.finish()
        sub.finish()
        return {**figure("paho-mqtt -> Mosquitto", n, first, last), "paho": getattr(paho.mqtt, "__version__", "?")}
    finally:
        broker.terminate()
        broker.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000, help="messages per run (default 100,000)")
    ap.add_argument("--quick", action="store_true", help="10,000 messages per run; for tests")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks", help="where python.json and python.md go")
    ap.add_argument("--hubmsg", type=Path, default=ROOT / "target" / "release" / "hubmsg", help="the hubmsg CLI binary")
    args = ap.parse_args()
    n = 10_000 if args.quick else args.messages
    n_blocking = min(n, 2_000)
    if not args.hubmsg.exists():
        print(f"{args.hubmsg} is missing: cargo build --release -p hubmsg-cli", file=sys.stderr)
        return 2
    import hubmsg

    work = Path(tempfile.mkdtemp(prefix="hubmsg-pybench-"))
    runs: list[dict[str, Any]] = []
    unavailable = ""
    try:
        print(f"D2C, 1 device, {len(BODY)} B, QoS 1, fsync'd; {n} messages per run (blocking send(): {n_blocking})", flush=True)
        for label, sender, count in [
            ("hubmsg Python send_many (batches of 1000)", "send_many", n),
            ("hubmsg Python asyncio (1000 sends outstanding)", "async", n),
            ("hubmsg Python blocking send() per message", "send", n_blocking),
            ("hubmsg Rust client (hubmsg device send --batch 1000)", "rust", n),
        ]:
            r = hubmsg_run(args.hubmsg, work, sender, count, sender)
            r["label"] = label
            runs.append(r)
            print(f"  {label:<56} {r['msgs_per_sec']:>9,} msg/s  ({count} in {r['seconds']:.2f} s)", flush=True)
        mosquitto, unavailable = ensure_mosquitto()
        if mosquitto:
            r = paho_run(mosquitto, work, n)
            runs.append(r)
            print(f"  {r['label'] + ' (paho ' + r['paho'] + ')':<56} {r['msgs_per_sec']:>9,} msg/s  ({n} in {r['seconds']:.2f} s)", flush=True)
        else:
            print(f"  paho-mqtt -> Mosquitto: unavailable: {unavailable}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    by = {r["label"]: r["msgs_per_sec"] for r in runs}
    best = max(by[runs[0]["label"]], by[runs[1]["label"]])
    rust = by[runs[3]["label"]]
    paho = runs[4]["msgs_per_sec"] if len(runs) > 4 else None
    ratios = {"python_best_vs_rust": round(best / rust, 2), "python_best_vs_paho": round(best / paho, 2) if paho else None}
    print(f"hubmsg Python (best) / Rust client: {ratios['python_best_vs_rust']:.2f}x (goal >= {GOAL_RUST:.2f}x)")
    if paho:
        print(f"hubmsg Python (best) / paho-mqtt:   {ratios['python_best_vs_paho']:.2f}x (goal >= {GOAL_PAHO:.1f}x)")
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "hubmsg": hubmsg.__version__,
        "body_bytes": len(BODY),
        "qos": 1,
        "durability": "always (device outbox and hub log fdatasync'd)",
        "method": "each sender and consumer is its own process; figure = (messages - 1) / (consumer's last distinct id - its first)",
        "runs": runs,
        "ratios": ratios,
        "goals": {"python_vs_paho": GOAL_PAHO, "python_vs_rust": GOAL_RUST},
        "paho_unavailable": unavailable or None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "python.json").write_text(json.dumps(result, indent=2) + "\n")
    write_md(args.out / "python.md", result)
    print(f"wrote {args.out / 'python.json'} and {args.out / 'python.md'}")
    return 0


def write_md(path: Path, r: dict[str, Any]) -> None:
    rows = "\n".join(f"| {x['label']} | {x['messages']:,} | {x['seconds']:.2f} | {x['msgs_per_sec']:,} |" for x in r["runs"])
    ratios = r["ratios"]
    paho_line = (
        f"| hubmsg Python (best) / paho-mqtt | {ratios['python_best_vs_paho']:.2f}x | >= {GOAL_PAHO:.1f}x |"
        if ratios["python_best_vs_paho"]
        else f"| hubmsg Python / paho-mqtt | unavailable: {r['paho_unavailable']} | >= {GOAL_PAHO:.1f}x |"
    )
    path.write_text(
        f"""# Python D2C benchmark

Written by `python bindings/python/bench/bench_d2c.py` (method and what each side does: the
docstring of that script and [README.md](README.md#python)). Machine: {r['machine']['cpus']} CPUs,
{r['machine']['platform']}, Python {r['machine']['python']}; hubmsg {r['hubmsg']}.

One device, {r['body_bytes']} B bodies, QoS 1, durability {r['durability']}; each sender and
consumer is its own process; figure = (messages - 1) / (the time the consumer saw the last
distinct message id - the time it saw the first).

| run | messages | seconds | msg/s |
|---|---|---|---|
{rows}

| ratio | value | goal |
|---|---|---|
| hubmsg Python (best) / Rust client | {ratios['python_best_vs_rust']:.2f}x | >= {GOAL_RUST:.2f}x |
{paho_line}
"""
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        role, rest = sys.argv[1], sys.argv[2:]
        if role == "_consume":
            role_consume(rest[0], int(rest[1]), rest[2])
        elif role == "_send":
            role_send(rest[0], rest[1], rest[2], int(rest[3]), rest[4])
        elif role == "_paho_sub":
            role_paho_sub(int(rest[0]), int(rest[1]))
        elif role == "_paho_pub":
            role_paho_pub(int(rest[0]), int(rest[1]))
        sys.exit(0)
    sys.exit(main())
