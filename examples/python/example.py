"""Shared by the Python examples: the "demo mode" that runs a hub inside the example's own
process (in a temporary directory) when no connection string is given — the counterpart of
examples/c/example.h."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Optional

import hubmsg


class Demo:
    """A temporary directory and an embedded hub in it on 127.0.0.1, port 0, with C2D feedback
    batched every 200 ms (IoT Hub batches every 15 s). Use it as a context manager."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hubmsg-example-"))
        self.hub: Optional[hubmsg.Hub] = None

    def start(self) -> hubmsg.Hub:
        """Starts (or restarts) the hub on its data directory."""
        listen = f"127.0.0.1:{self.hub.port}" if self.hub is not None else "127.0.0.1:0"
        self.hub = hubmsg.Hub(self.dir / "hub", listen=listen, feedback_interval=0.2)
        print(f"demo mode: embedded hub on {self.hub.address} (data in {self.dir})")
        return self.hub

    def stop_hub(self) -> None:
        """Stops the hub (its data stays)."""
        if self.hub is not None:
            self.hub.shutdown()

    def path(self, name: str) -> Path:
        """A path inside the demo directory."""
        return self.dir / name

    def __enter__(self) -> Demo:
        return self

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.stop_hub()
        shutil.rmtree(self.dir, ignore_errors=True)
