"""asyncio clients: the same engine as the blocking ones, with ``async`` methods and
``async for`` streams.

Every method returns an awaitable driven by hubmsg's own runtime (no thread per call).
Cancelling an ``await`` is safe: a cancelled ``send`` either queued its message or not (never
half), and a cancelled ``receive``/``next`` loses nothing — an item that arrived at the last
moment goes back to its stream and is the next one received. Streams (``messages()``,
``events()``, ``feedback()``, ``status_changes()``) are the same objects as in the blocking API
and support ``async for``.

    async with await hubmsg.aio.DeviceClient.from_connection_string(cs, outbox_dir="ob") as dev:
        delivery = await dev.send(b"21.5", properties={"unit": "C"})
        print(await delivery.wait_async())
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, Optional, Union

from . import _hubmsg
from ._hubmsg import (
    C2dMessage,
    C2dReceipt,
    C2dStream,
    Delivery,
    DeviceIdentity,
    DeviceStats,
    EventStream,
    FeedbackRecord,
    FeedbackStream,
    Message,
    RetryPolicy,
    StatusStream,
)

if TYPE_CHECKING:  # aliases that exist in the stubs only
    from ._hubmsg import _Body as Body
    from ._hubmsg import _Expiry as Expiry
    from ._hubmsg import _Properties as Properties
    from ._hubmsg import _Seconds as Seconds
    from ._hubmsg import _Start as Start
    from ._hubmsg import _StatusName as StatusName
    from ._hubmsg import _StrPath as StrPath

__all__ = ["DeviceClient", "ServiceClient"]


class DeviceClient:
    """A device client for asyncio. Create it with ``await DeviceClient.connect(...)`` or
    ``await DeviceClient.from_connection_string(cs, ...)`` (the options of
    :class:`hubmsg.DeviceClient`); close it with ``await close()`` or ``async with``."""

    def __init__(self, inner: _hubmsg.DeviceClient) -> None:
        """Wraps a blocking client (both share one engine client)."""
        self._inner = inner

    @classmethod
    async def connect(
        cls,
        connection_string: Optional[str] = None,
        *,
        host_name: Optional[str] = None,
        device_id: Optional[str] = None,
        key: Optional[str] = None,
        sas_token: Optional[str] = None,
        outbox_dir: Optional[StrPath] = None,
        in_memory: bool = False,
        durability: str = "always",
        max_messages: int = 100000,
        max_bytes: int = 67108864,
        overflow: Literal["reject", "drop_oldest"] = "reject",
        retry: Optional[RetryPolicy] = None,
        ca_file: Optional[StrPath] = None,
        keep_alive: Seconds = 60.0,
        max_in_flight: int = 1000,
        connect_timeout: Seconds = 30.0,
    ) -> DeviceClient:
        """Opens the outbox and starts connecting in the background (see
        :class:`hubmsg.DeviceClient` for the options)."""
        inner = await _hubmsg.DeviceClient.connect_async(
            connection_string,
            host_name=host_name,
            device_id=device_id,
            key=key,
            sas_token=sas_token,
            outbox_dir=outbox_dir,
            in_memory=in_memory,
            durability=durability,
            max_messages=max_messages,
            max_bytes=max_bytes,
            overflow=overflow,
            retry=retry,
            ca_file=ca_file,
            keep_alive=keep_alive,
            max_in_flight=max_in_flight,
            connect_timeout=connect_timeout,
        )
        return cls(inner)

    @classmethod
    async def from_connection_string(
        cls,
        connection_string: str,
        *,
        outbox_dir: Optional[StrPath] = None,
        in_memory: bool = False,
        durability: str = "always",
        max_messages: int = 100000,
        max_bytes: int = 67108864,
        overflow: Literal["reject", "drop_oldest"] = "reject",
        retry: Optional[RetryPolicy] = None,
        ca_file: Optional[StrPath] = None,
        keep_alive: Seconds = 60.0,
        max_in_flight: int = 1000,
        connect_timeout: Seconds = 30.0,
    ) -> DeviceClient:
        """``await DeviceClient.connect(connection_string, ...)``."""
        return await cls.connect(
            connection_string,
            outbox_dir=outbox_dir,
            in_memory=in_memory,
            durability=durability,
            max_messages=max_messages,
            max_bytes=max_bytes,
            overflow=overflow,
            retry=retry,
            ca_file=ca_file,
            keep_alive=keep_alive,
            max_in_flight=max_in_flight,
            connect_timeout=connect_timeout,
        )

    @property
    def device_id(self) -> str:
        """The device id."""
        return self._inner.device_id

    @property
    def status(self) -> StatusName:
        """The connection status."""
        return self._inner.status

    @property
    def blocking(self) -> _hubmsg.DeviceClient:
        """The same client with the blocking API."""
        return self._inner

    async def send(
        self,
        body: Body,
        *,
        properties: Optional[Properties] = None,
        message_id: Optional[str] = None,
        correlation_id: Optional[str] = None,
        content_type: Optional[str] = None,
        content_encoding: Optional[str] = None,
        expiry: Optional[Expiry] = None,
    ) -> Delivery:
        """Queues a message; resolves once it is durable in the outbox (see
        :meth:`hubmsg.DeviceClient.send`). Many concurrent sends share one fsync."""
        return await self._inner.send_async(
            body,
            properties=properties,
            message_id=message_id,
            correlation_id=correlation_id,
            content_type=content_type,
            content_encoding=content_encoding,
            expiry=expiry,
        )

    async def send_many(self, messages: Iterable[Union[Message, Body]]) -> list[Delivery]:
        """Queues several messages in order; resolves once all are durable (one fsync)."""
        return await self._inner.send_many_async(messages)

    async def flush(self, timeout: Optional[Seconds] = None) -> None:
        """Waits until every queued message reached an outcome (HubmsgTimeoutError after
        ``timeout`` seconds; nothing is lost)."""
        await self._inner.flush_async(timeout)

    async def receive(self, timeout: Optional[Seconds] = None) -> Optional[C2dMessage]:
        """The next C2D message, or None after ``timeout`` seconds. Cancel-safe."""
        return await self._inner.receive_async(timeout)

    def messages(self) -> C2dStream:
        """The C2D messages, for ``async for``."""
        return self._inner.messages()

    def status_changes(self) -> StatusStream:
        """The status changes, for ``async for``."""
        return self._inner.status_changes()

    def stats(self) -> DeviceStats:
        """Counters of the outbox and the connection."""
        return self._inner.stats()

    def reconnect(self) -> None:
        """Asks a client in status "failed" to try again."""
        self._inner.reconnect()

    async def close(self) -> None:
        """Drains messages in flight (up to 10 s) and closes the outbox. Idempotent."""
        await self._inner.close_async()

    async def __aenter__(self) -> DeviceClient:
        return self

    async def __aexit__(self, *_args: object) -> None:
        await self.close()


class ServiceClient:
    """A service client for asyncio. Create it with ``await
    ServiceClient.from_connection_string(cs)``; close it with ``await close()`` or
    ``async with``."""

    def __init__(self, inner: _hubmsg.ServiceClient) -> None:
        """Wraps a blocking client (both share one engine client)."""
        self._inner = inner

    @classmethod
    async def from_connection_string(
        cls,
        connection_string: str,
        *,
        ca_file: Optional[StrPath] = None,
        request_timeout: Optional[Seconds] = None,
        retry: Optional[RetryPolicy] = None,
    ) -> ServiceClient:
        """Connects (in the background) with a policy connection string."""
        inner = await _hubmsg.ServiceClient.connect_async(
            connection_string, ca_file=ca_file, request_timeout=request_timeout, retry=retry
        )
        return cls(inner)

    @property
    def status(self) -> StatusName:
        """The connection status."""
        return self._inner.status

    @property
    def blocking(self) -> _hubmsg.ServiceClient:
        """The same client with the blocking API."""
        return self._inner

    async def create_device(
        self, device_id: str, *, primary_key: Optional[str] = None, secondary_key: Optional[str] = None, enabled: bool = True
    ) -> DeviceIdentity:
        """Registers a device (AlreadyExistsError if the id is taken)."""
        return await self._inner.create_device_async(device_id, primary_key=primary_key, secondary_key=secondary_key, enabled=enabled)

    async def get_device(self, device_id: str) -> DeviceIdentity:
        """A device's identity (NotFoundError)."""
        return await self._inner.get_device_async(device_id)

    async def list_devices(self) -> list[DeviceIdentity]:
        """Every device, ordered by id."""
        return await self._inner.list_devices_async()

    async def delete_device(self, device_id: str) -> None:
        """Deletes a device (NotFoundError)."""
        await self._inner.delete_device_async(device_id)

    async def enable_device(self, device_id: str) -> DeviceIdentity:
        """Enables a device."""
        return await self._inner.enable_device_async(device_id)

    async def disable_device(self, device_id: str) -> DeviceIdentity:
        """Disables a device (it is disconnected and refused)."""
        return await self._inner.disable_device_async(device_id)

    async def regenerate_keys(self, device_id: str, which: Literal["primary", "secondary", "both"] = "both") -> DeviceIdentity:
        """Regenerates a device's keys."""
        return await self._inner.regenerate_keys_async(device_id, which)

    async def device_connection_string(self, device_id: str) -> str:
        """The connection string of a registered device."""
        return await self._inner.device_connection_string_async(device_id)

    async def send_c2d(
        self,
        device_id: str,
        body: Body,
        *,
        ack: Literal["none", "positive", "negative", "full"] = "none",
        ttl: Optional[Seconds] = None,
        properties: Optional[Properties] = None,
        message_id: Optional[str] = None,
        correlation_id: Optional[str] = None,
        content_type: Optional[str] = None,
        content_encoding: Optional[str] = None,
        expiry: Optional[Expiry] = None,
    ) -> C2dReceipt:
        """Sends a C2D message; resolves once the hub holds it durably."""
        return await self._inner.send_c2d_async(
            device_id,
            body,
            ack=ack,
            ttl=ttl,
            properties=properties,
            message_id=message_id,
            correlation_id=correlation_id,
            content_type=content_type,
            content_encoding=content_encoding,
            expiry=expiry,
        )

    async def send_c2d_and_wait(
        self,
        device_id: str,
        body: Body,
        *,
        ack: Literal["none", "positive", "negative", "full"] = "full",
        timeout: Optional[Seconds] = None,
        ttl: Optional[Seconds] = None,
        properties: Optional[Properties] = None,
        message_id: Optional[str] = None,
        correlation_id: Optional[str] = None,
    ) -> FeedbackRecord:
        """Sends a C2D message and resolves with its feedback record (timeout: 60 s)."""
        return await self._inner.send_c2d_and_wait_async(
            device_id,
            body,
            ack=ack,
            timeout=timeout,
            ttl=ttl,
            properties=properties,
            message_id=message_id,
            correlation_id=correlation_id,
        )

    async def purge_c2d(self, device_id: str) -> int:
        """Removes every pending C2D message of a device; returns how many."""
        return await self._inner.purge_c2d_async(device_id)

    def feedback(self) -> FeedbackStream:
        """The feedback batches, for ``async for``."""
        return self._inner.feedback()

    async def events(self, consumer_group: str = "$Default", start: Optional[Start] = None) -> EventStream:
        """Opens a reader of a consumer group, for ``async for`` (see
        :meth:`hubmsg.ServiceClient.events`)."""
        return await self._inner.events_async(consumer_group, start)

    async def close(self) -> None:
        """Closes the client. Idempotent."""
        await self._inner.close_async()

    async def __aenter__(self) -> ServiceClient:
        return self

    async def __aexit__(self, *_args: object) -> None:
        await self.close()
