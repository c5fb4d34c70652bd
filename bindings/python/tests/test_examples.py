"""The Python examples run as a reader would run them: no arguments (demo mode with an
embedded hub in a temporary directory), and `send_telemetry` with a connection string."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HubInfo

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "python"


def run(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=EXAMPLES,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "name,args,expect",
    [
        ("send_telemetry", ["200"], "delivered 200 of 200"),
        ("receive_commands", ["8"], "received 8 commands"),
        ("service_monitor", ["30"], "received 30 events"),
        ("offline_buffering", ["300"], "lost 0"),
    ],
)
def test_example_in_demo_mode(name: str, args: list[str], expect: str) -> None:
    r = run(name, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert expect in r.stdout, r.stdout
    assert "demo mode" in r.stdout


def test_receive_commands_prints_the_feedback_of_completed_and_rejected_commands() -> None:
    r = run("receive_commands", "4")
    assert r.returncode == 0, r.stderr
    assert "feedback: cmd-0 -> Success" in r.stdout and "feedback: cmd-3 -> Rejected" in r.stdout, r.stdout


def test_send_telemetry_with_a_connection_string(hub: HubInfo) -> None:
    _, cs = hub.device("ext")
    r = run("send_telemetry", "25", env={"HUBMSG_DEVICE_CONNECTION_STRING": cs, "HUBMSG_OUTBOX_DIR": str(hub.outbox("ext"))})
    assert r.returncode == 0 and "delivered 25 of 25" in r.stdout, r.stdout + r.stderr
    assert "demo mode" not in r.stdout
