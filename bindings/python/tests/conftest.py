"""Fixtures: an embedded hub on 127.0.0.1 port 0 in a temporary directory, with a service
client and helpers to register devices."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import hubmsg

_ids = itertools.count()


class HubInfo:
    """The running hub of a test plus what tests need from it."""

    def __init__(self, hub: hubmsg.Hub, root: Path) -> None:
        self.hub = hub
        self.root = root

    def device(self, prefix: str = "dev") -> tuple[str, str]:
        """Registers a fresh device; returns (device_id, connection string)."""
        device_id = f"{prefix}-{next(_ids)}"
        return device_id, self.hub.create_device(device_id)

    def outbox(self, name: str) -> Path:
        """A path for an outbox directory."""
        return self.root / "outboxes" / name

    @property
    def service_cs(self) -> str:
        return self.hub.service_connection_string


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubInfo]:
    """A hub with feedback batched every 100 ms and C2D locks of 1 s (fast tests)."""
    with hubmsg.Hub(tmp_path / "hub", feedback_interval=0.1, lock_timeout=1.0) as h:
        yield HubInfo(h, tmp_path)


@pytest.fixture
def service(hub: HubInfo) -> Iterator[hubmsg.ServiceClient]:
    with hubmsg.ServiceClient.from_connection_string(hub.service_cs) as svc:
        yield svc


def run_python(code: str, *args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a fresh interpreter (the test's own Python) and returns its result."""
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)  # type: ignore[call-overload,no-any-return]
