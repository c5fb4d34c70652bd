"""hubmsg: reliable device <-> cloud messaging in the style of Azure IoT Hub.

The engine is Rust (``hubmsg._hubmsg``); this package is a thin skin over it:

- :class:`DeviceClient` sends D2C telemetry through a durable, bounded outbox (``send`` returns
  once the message is durable) and receives C2D commands (``receive``, ``messages()``) that it
  completes, abandons or rejects;
- :class:`ServiceClient` manages device identities, sends C2D commands with feedback, and reads
  D2C events by consumer group (``events()``) with ``ack()`` and ``checkpoint()``;
- :class:`Hub` runs a hub inside the process (port 0), so tests need no external process;
- :mod:`hubmsg.aio` offers the same clients for asyncio.

Errors are :class:`HubmsgError` subclasses, one per engine error kind (``QueueFullError``,
``NotFoundError``, ``HubmsgTimeoutError`` …), each with ``.kind``. Engine logs go to the
``logging`` logger ``"hubmsg"``.
"""

from __future__ import annotations

import atexit

from . import _hubmsg
from ._hubmsg import (
    ERROR_CLASSES,
    AlreadyExistsError,
    C2dMessage,
    C2dReceipt,
    C2dStream,
    ClosedError,
    Delivery,
    DeviceClient,
    DeviceIdentity,
    DeviceStats,
    DisconnectedError,
    Event,
    EventStream,
    ExpiredError,
    FeedbackBatch,
    FeedbackRecord,
    FeedbackStream,
    Hub,
    HubmsgError,
    HubmsgTimeoutError,
    InternalError,
    InvalidArgumentError,
    LockLostError,
    Message,
    MessageTooLargeError,
    NotFoundError,
    ProtocolError,
    QueueFullError,
    RetryPolicy,
    ServiceClient,
    Status,
    StatusStream,
    StorageError,
    UnauthorizedError,
    UsageError,
)

__version__: str = _hubmsg.__version__

# hubmsg's own threads (asyncio completions, logs) stop calling into Python before the
# interpreter finalizes (one that takes the GIL then is ended by CPython, aborting the process).
atexit.register(_hubmsg._close_gate)

__all__ = [
    "ERROR_CLASSES",
    "AlreadyExistsError",
    "C2dMessage",
    "C2dReceipt",
    "C2dStream",
    "ClosedError",
    "Delivery",
    "DeviceClient",
    "DeviceIdentity",
    "DeviceStats",
    "DisconnectedError",
    "Event",
    "EventStream",
    "ExpiredError",
    "FeedbackBatch",
    "FeedbackRecord",
    "FeedbackStream",
    "Hub",
    "HubmsgError",
    "HubmsgTimeoutError",
    "InternalError",
    "InvalidArgumentError",
    "LockLostError",
    "Message",
    "MessageTooLargeError",
    "NotFoundError",
    "ProtocolError",
    "QueueFullError",
    "RetryPolicy",
    "ServiceClient",
    "Status",
    "StatusStream",
    "StorageError",
    "UnauthorizedError",
    "UsageError",
    "__version__",
]
