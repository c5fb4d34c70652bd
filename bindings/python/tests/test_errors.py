"""Exceptions: the class table, every class raised by a real case, and bad input — wrong
types, a body over the limit, a bad connection string, a closed client — each a clear
exception, never a crash of the interpreter."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import hubmsg
from conftest import HubInfo

KINDS = [
    "INVALID_ARGUMENT", "UNAUTHORIZED", "NOT_FOUND", "ALREADY_EXISTS", "QUEUE_FULL", "MESSAGE_TOO_LARGE",
    "TIMEOUT", "DISCONNECTED", "STORAGE", "PROTOCOL", "CLOSED", "EXPIRED", "LOCK_LOST", "USAGE", "INTERNAL",
]  # fmt: skip


def test_one_class_per_engine_kind_generated_from_the_kind_table() -> None:
    assert list(hubmsg.ERROR_CLASSES) == KINDS  # core's ErrorKind::ALL, in order
    for code, cls in hubmsg.ERROR_CLASSES.items():
        assert issubclass(cls, hubmsg.HubmsgError) and cls.kind == code
        assert getattr(hubmsg, cls.__name__) is cls, f"hubmsg.{cls.__name__} is not exported"
        assert cls.__doc__ and code in cls.__doc__
    assert issubclass(hubmsg.HubmsgTimeoutError, TimeoutError)
    assert issubclass(hubmsg.InvalidArgumentError, ValueError)
    assert hubmsg.QueueFullError.__name__ == "QueueFullError" and hubmsg.QueueFullError.__module__ == "hubmsg"


@pytest.fixture
def fake_hub() -> Iterator[tuple[str, list[bytes]]]:
    """A TCP server on 127.0.0.1 that answers each connection with the next canned reply
    (b"" = close at once)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    replies: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            with c:
                c.settimeout(2)
                try:
                    c.recv(4096)
                    c.sendall(replies[0] if replies else b"")
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.getsockname()[1]}", replies
    stop.set()
    t.join(5)
    srv.close()


def service_at(host: str) -> hubmsg.ServiceClient:
    return hubmsg.ServiceClient(
        f"HostName={host};SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5a2V5a2V5",
        retry=hubmsg.RetryPolicy.never(),
        request_timeout=10,
    )


def test_every_class_raised_by_a_real_case(hub: HubInfo, service: hubmsg.ServiceClient, tmp_path: Path, fake_hub: tuple[str, list[bytes]]) -> None:
    raised: set[str] = set()

    def expect(cls: type[hubmsg.HubmsgError], f: object, *args: object, **kw: object) -> hubmsg.HubmsgError:
        with pytest.raises(cls) as info:
            f(*args, **kw)  # type: ignore[operator]
        assert str(info.value), f"{cls.__name__} without a message"
        assert info.value.kind == cls.kind
        raised.add(cls.kind)
        return info.value

    expect(hubmsg.InvalidArgumentError, hubmsg.DeviceClient.from_connection_string, "HostName=x")
    bad_key = hub.service_cs.rsplit("SharedAccessKey=", 1)[0] + "SharedAccessKey=a2V5a2V5a2V5"
    with hubmsg.ServiceClient(bad_key, retry=hubmsg.RetryPolicy.never()) as svc:
        expect(hubmsg.UnauthorizedError, svc.list_devices)
    expect(hubmsg.NotFoundError, service.get_device, "nobody")
    service.create_device("twice")
    expect(hubmsg.AlreadyExistsError, service.create_device, "twice")
    down = "HostName=127.0.0.1:1;DeviceId=d;SharedAccessKey=a2V5a2V5a2V5"
    with hubmsg.DeviceClient.from_connection_string(down, in_memory=True, max_messages=2, retry=hubmsg.RetryPolicy.never()) as dev:
        dev.send(b"1")
        dev.send(b"2")
        e = expect(hubmsg.QueueFullError, dev.send, b"3")
        assert "2" in str(e)
        expect(hubmsg.MessageTooLargeError, dev.send, b"x" * (256 * 1024 + 1))
        expect(hubmsg.HubmsgTimeoutError, dev.flush, 0.1)
    host, replies = fake_hub
    with service_at(host) as svc:  # accepts, then closes before CONNACK
        expect(hubmsg.DisconnectedError, svc.list_devices)
    replies.append(b"\xff\x00garbage")
    with service_at(host) as svc:  # answers CONNECT with bytes that are no MQTT packet
        expect(hubmsg.ProtocolError, svc.list_devices)
    (tmp_path / "file").write_text("not a directory")
    expect(hubmsg.StorageError, hubmsg.DeviceClient.from_connection_string, down, outbox_dir=tmp_path / "file" / "ob")
    dev2 = hubmsg.DeviceClient.from_connection_string(down, in_memory=True)
    dev2.close()
    expect(hubmsg.ClosedError, dev2.send, b"late")
    device_id, cs = hub.device()
    service.send_c2d(device_id, "once")
    with hubmsg.DeviceClient.from_connection_string(cs, in_memory=True) as dev3:
        msg = dev3.receive(20)
        assert msg is not None
        msg.complete()
        e = expect(hubmsg.UsageError, msg.complete)
        assert "already settled" in str(e)
    # EXPIRED, LOCK_LOST and INTERNAL are never raised by the client API: an expired message is
    # an outcome ("expired"), a lost lock is the hub's business, INTERNAL is a bug.
    assert raised == set(KINDS) - {"EXPIRED", "LOCK_LOST", "INTERNAL"}


def test_an_expired_message_is_an_outcome(hub: HubInfo) -> None:
    _, cs = hub.device()
    with hubmsg.DeviceClient.from_connection_string(cs, in_memory=True) as dev:
        d = dev.send(b"stale", expiry=0.0)
        assert d.wait(20) == "expired"
        assert dev.stats().expired == 1


def test_bad_input_is_a_clear_exception(hub: HubInfo) -> None:
    _, cs = hub.device()
    with hubmsg.DeviceClient.from_connection_string(cs, in_memory=True) as dev:
        with pytest.raises(TypeError, match="body must be bytes"):
            dev.send(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="property 'n' must be a str"):
            dev.send(b"x", properties={"n": 1})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="mapping"):
            dev.send(b"x", properties=["a"])  # type: ignore[arg-type]
        with pytest.raises(hubmsg.InvalidArgumentError, match="finite"):
            dev.send(b"x", expiry=float("nan"))
        with pytest.raises(hubmsg.InvalidArgumentError):
            dev.send(b"x", properties={"": "empty name"})
        with pytest.raises(hubmsg.InvalidArgumentError, match="message_id is empty"):
            dev.send(b"x", message_id="")
        with pytest.raises(TypeError):
            dev.send_many([b"ok", 3])  # type: ignore[list-item]
        with pytest.raises(hubmsg.InvalidArgumentError, match="timeout"):
            dev.receive(timeout=-1)
        with pytest.raises(TypeError, match="timeout"):
            dev.flush("soon")  # type: ignore[arg-type]
        assert dev.stats().depth == 0, "a refused send queued something"
        assert dev.send(b"still works").wait(20) == "delivered"
    for bad in ["", "nonsense", "HostName=h;SharedAccessKeyName=p;SharedAccessKey=a2V5"]:
        with pytest.raises(hubmsg.InvalidArgumentError):
            hubmsg.DeviceClient.from_connection_string(bad)
    with pytest.raises(hubmsg.InvalidArgumentError, match="device string"):
        hubmsg.ServiceClient(cs)
    with pytest.raises(TypeError, match="unexpected keyword argument 'outbox'"):
        hubmsg.DeviceClient.from_connection_string(cs, outbox="x")
    with pytest.raises(hubmsg.InvalidArgumentError, match="not both"):
        hubmsg.DeviceClient.from_connection_string(cs, outbox_dir="x", in_memory=True)
    with pytest.raises(hubmsg.InvalidArgumentError, match="overflow"):
        hubmsg.DeviceClient.from_connection_string(cs, overflow="sometimes")
    with pytest.raises(hubmsg.InvalidArgumentError, match="durability"):
        hubmsg.DeviceClient.from_connection_string(cs, durability="maybe")
    with pytest.raises(hubmsg.InvalidArgumentError, match="multiplier"):
        hubmsg.RetryPolicy(multiplier=0.5)
    with pytest.raises(hubmsg.InvalidArgumentError, match="listen"):
        hubmsg.Hub(hub.root / "h2", listen="nowhere")


def test_closed_clients_and_streams_raise_closed(hub: HubInfo) -> None:
    _, cs = hub.device()
    dev = hubmsg.DeviceClient.from_connection_string(cs, in_memory=True)
    dev.close()
    dev.close()  # idempotent
    for call in (lambda: dev.send(b"x"), lambda: dev.receive(0.1), lambda: dev.flush(1), dev.messages):
        with pytest.raises(hubmsg.ClosedError, match="closed"):
            call()
    svc = hubmsg.ServiceClient(hub.service_cs)
    svc.close()
    with pytest.raises(hubmsg.ClosedError):
        svc.list_devices()
    stream = hubmsg.ServiceClient(hub.service_cs).events("$Default")
    stream.close()
    with pytest.raises(hubmsg.ClosedError):
        stream.next(1)
    assert list(stream) == []
    h = hubmsg.Hub(hub.root / "h3")
    h.shutdown()
    with pytest.raises(hubmsg.ClosedError):
        h.create_device("x")
