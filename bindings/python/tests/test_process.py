"""Real processes: a device process SIGKILLed while sending 10,000 messages loses none whose
send() returned; SIGINT interrupts a blocked receive(); os.fork() gives the child a clear
error for inherited clients and working new ones; engine logs reach `logging`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hubmsg
from conftest import HubInfo, run_python

SENDER = r"""
import sys, hubmsg
cs, outbox, total, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dev = hubmsg.DeviceClient.from_connection_string(cs, outbox_dir=outbox)
for i in range(start, total):
    dev.send(b"%d" % i, message_id=str(i))
    print(i, flush=True)   # printed only after send() returned: the message is durable
dev.flush(120)
dev.close()
print("done", flush=True)
"""


def test_a_killed_device_process_loses_no_sent_message(hub: HubInfo, service: hubmsg.ServiceClient) -> None:
    total = 10_000
    _, cs = hub.device()
    outbox = str(hub.outbox("crash"))
    proc = subprocess.Popen([sys.executable, "-c", SENDER, cs, outbox, str(total), "0"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acked = -1
    for line in proc.stdout:  # kill it in the middle of sending
        acked = int(line)
        if acked >= 3_000:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(30)
    for line in proc.stdout:  # lines written before the kill
        if line.strip().isdigit():
            acked = max(acked, int(line))
    assert proc.returncode == -signal.SIGKILL and acked >= 3_000
    # Restart on the same outbox and send the rest.
    rest = subprocess.run(
        [sys.executable, "-c", SENDER, cs, outbox, str(total), str(acked + 1)], capture_output=True, text=True, timeout=300
    )
    assert rest.returncode == 0 and rest.stdout.rstrip().endswith("done"), rest.stderr
    seen: set[str] = set()
    with service.events("crash-check", start="earliest") as stream:
        while len(seen) < total:
            ev = stream.next(30)
            assert ev is not None, f"{total - len(seen)} messages lost, e.g. {sorted(set(map(str, range(total))) - seen)[:5]}"
            ev.ack()
            assert ev.message_id is not None
            seen.add(ev.message_id)
    assert seen == {str(i) for i in range(total)}  # 0 lost (duplicates are allowed)


def test_sigint_interrupts_a_blocked_receive(hub: HubInfo) -> None:
    _, cs = hub.device()
    code = r"""
import faulthandler, signal, sys, time, hubmsg
faulthandler.register(signal.SIGUSR1)  # the test asks for a traceback if this hangs
# A shell that starts a job in the background hands it SIGINT ignored, and Python then keeps it
# ignored: restore Python's own handler, as an interactive program has it.
signal.signal(signal.SIGINT, signal.default_int_handler)
dev = hubmsg.DeviceClient.from_connection_string(sys.argv[1], in_memory=True)
print("ready", flush=True)
try:
    dev.receive(timeout=60)
    print("returned", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(3)
"""
    proc = subprocess.Popen([sys.executable, "-c", code, cs], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # let it block in receive()
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"no exit 10 s after SIGINT; its threads:\n{err}")
    elapsed = time.monotonic() - sent
    assert proc.returncode == 3 and "interrupted" in out, (out, err)
    assert elapsed < 2.0, f"KeyboardInterrupt took {elapsed:.2f} s"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_gets_a_clear_error_for_inherited_clients_and_new_ones_work(hub: HubInfo, tmp_path: Path) -> None:
    _, cs = hub.device()
    code = r"""
import os, sys, hubmsg, warnings
warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
cs, outbox = sys.argv[1], sys.argv[2]
parent = hubmsg.DeviceClient.from_connection_string(cs, in_memory=True)
parent.send(b"before fork").wait(20)
pid = os.fork()
if pid == 0:
    try:
        parent.send(b"from child")
        os._exit(10)
    except hubmsg.UsageError as e:
        assert "fork()" in str(e), e
    try:
        child = hubmsg.DeviceClient.from_connection_string(cs, outbox_dir=outbox)
        assert child.send(b"child's own").wait(20) == "delivered"
        child.close()
    except Exception as e:
        print("child failed:", repr(e), flush=True)
        os._exit(11)
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert parent.send(b"parent after fork").wait(20) == "delivered"
parent.close()
print("child exit", os.waitstatus_to_exitcode(status), flush=True)
"""
    r = run_python(code, cs, str(tmp_path / "child-outbox"), timeout=60)
    assert r.returncode == 0 and "child exit 0" in r.stdout, (r.stdout, r.stderr)


def test_engine_logs_go_to_the_logging_module(hub: HubInfo, caplog: pytest.LogCaptureFixture) -> None:
    _, cs = hub.device()
    bad = cs.rsplit("SharedAccessKey=", 1)[0] + "SharedAccessKey=a2V5a2V5a2V5"
    with caplog.at_level(logging.DEBUG, logger="hubmsg"):
        with hubmsg.DeviceClient.from_connection_string(bad, in_memory=True, retry=hubmsg.RetryPolicy.never()) as dev:
            for s in dev.status_changes():
                if s.status == "failed":
                    break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("connection failed" in r.getMessage() for r in caplog.records):
            time.sleep(0.02)  # the log thread hands records over asynchronously
    records = [r for r in caplog.records if r.name == "hubmsg"]
    assert records, "no engine log reached logging"
    assert any("connection failed" in r.getMessage() for r in records), [r.getMessage() for r in records]
    assert all(getattr(r, "hubmsg_target", "").startswith("hubmsg") for r in records)


def test_the_interpreter_exits_cleanly_with_engine_work_in_flight(hub: HubInfo) -> None:
    """hubmsg's threads (asyncio completions, logs) must not call into a finalizing interpreter:
    CPython ends such a thread with pthread_exit, which aborts the process (SIGABRT)."""
    _, cs = hub.device()
    code = r"""
import asyncio, logging, sys, hubmsg, hubmsg.aio
logging.basicConfig(level=logging.DEBUG)   # engine logs flow through the log thread
async def main():
    dev = await hubmsg.aio.DeviceClient.from_connection_string(sys.argv[1], in_memory=True)
    await asyncio.gather(*(dev.send(b"x") for _ in range(500)))
    for _ in range(200):  # completions still on their way when the loop and the process end
        asyncio.ensure_future(dev.send(b"y"))
    asyncio.ensure_future(dev.receive())
asyncio.run(main())
"""
    for _ in range(5):
        r = run_python(code, cs, timeout=60)
        assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
