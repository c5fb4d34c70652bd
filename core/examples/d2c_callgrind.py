#!/usr/bin/env python3
"""Instructions per D2C message of each process — hub, device, consumer — with callgrind.

Runs `hubmsg hub`, a device (`hubmsg device send --batch 1000`, 256-byte bodies, durable
outbox) and a consumer (`hubmsg monitor-events --from earliest`, which also formats and writes
one line per event to /dev/null), each as its own process under `valgrind --tool=callgrind`,
twice: with N and with 2N messages. Instructions per message of each process =
(instructions of the 2N run - those of the N run) / N, so start-up, connecting and shutting
down cancel out. Instruction counts do not depend on the machine's load; wall-clock figures do.

    cargo build --release -p hubmsg-cli
    python3 core/examples/d2c_callgrind.py [--messages 10000] [--durability always|never] [--hubmsg PATH] [--keep DIR]
"""

import argparse
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grind(out, name):
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/{name}.out", "--dump-instr=no"]


def instructions(out, name):
    total = 0
    for f in glob.glob(f"{out}/{name}.out*"):
        with open(f) as fh:
            m = re.search(r"^(?:summary|totals):\s+(\d+)", fh.read(), re.M)
        if m:
            total += int(m.group(1))
    return total


def run(exe, n, durability, work):
    """One run with n messages; returns {process: instructions}."""
    out = os.path.join(work, f"cg{n}")
    os.makedirs(out)
    port = free_port()
    hub = subprocess.Popen(
        grind(out, "hub") + [exe, "hub", "--data", f"{work}/hub{n}", "--mqtt", f"127.0.0.1:{port}", "--durability", durability],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    cs = None
    for line in hub.stdout:
        if line.startswith("HUBMSG_HUB_CONNECTION_STRING_FILE="):
            cs = open(line.split("=", 1)[1].strip()).read().strip()
            break
    if not cs:
        sys.exit("the hub printed no connection string")
    env = dict(os.environ, HUBMSG_HUB_CONNECTION_STRING=cs)
    subprocess.run([exe, "device-identity", "create", "--device-id", "dev-0"], env=env, check=True, stdout=subprocess.DEVNULL)
    dev_cs = subprocess.run([exe, "device-identity", "connection-string", "--device-id", "dev-0"], env=env, check=True,
                            stdout=subprocess.PIPE, text=True).stdout.strip()
    consumer = subprocess.Popen(grind(out, "consumer") + [exe, "monitor-events", "--from", "earliest", "--count", str(n)],
                                env=env, stdout=subprocess.DEVNULL)
    body = "x" * 256
    subprocess.run(grind(out, "device") + [exe, "device", "send", "--data", body, "--count", str(n), "--batch", "1000",
                                           "--outbox", f"{work}/outbox{n}", "--durability", durability,
                                           "--message-id-prefix", "m-", "--flush-timeout-secs", "600"],
                   env=dict(env, HUBMSG_DEVICE_CONNECTION_STRING=dev_cs), check=True, stdout=subprocess.DEVNULL)
    consumer.wait(timeout=900)
    hub.terminate()
    hub.wait(timeout=120)
    return {p: instructions(out, p) for p in ("hub", "device", "consumer")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--durability", default="always")
    ap.add_argument("--hubmsg", default=os.path.join(TARGET, "release", "hubmsg"))
    ap.add_argument("--keep", help="keep the callgrind files (for callgrind_annotate) under this directory")
    a = ap.parse_args()
    work = a.keep or tempfile.mkdtemp(prefix="d2c-callgrind-")
    os.makedirs(work, exist_ok=True)
    try:
        n = a.messages
        small, large = run(a.hubmsg, n, a.durability, work), run(a.hubmsg, 2 * n, a.durability, work)
        print(f"{a.hubmsg}: {n} vs {2 * n} messages of 256 B, durability {a.durability}; instructions per message:")
        total = 0
        for p in ("hub", "device", "consumer"):
            per = (large[p] - small[p]) / n
            total += per
            print(f"  {p:9} {per:8.0f}")
        print(f"  {'all':9} {total:8.0f}")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
