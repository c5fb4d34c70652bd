"""Device side through an embedded hub: D2C with properties end to end, send_many, outcomes,
flush, status, stats, C2D receive and iteration."""

from __future__ import annotations

import datetime
import threading

import pytest

import hubmsg
from conftest import HubInfo


def read_events(svc: hubmsg.ServiceClient, n: int, group: str = "$Default", timeout: float = 20) -> list[hubmsg.Event]:
    out: list[hubmsg.Event] = []
    with svc.events(group, start="earliest") as stream:
        while len(out) < n:
            ev = stream.next(timeout)
            assert ev is not None, f"only {len(out)} of {n} events arrived"
            ev.ack()
            out.append(ev)
        stream.checkpoint()
    return out


def test_d2c_end_to_end_with_properties(hub: HubInfo, service: hubmsg.ServiceClient) -> None:
    device_id, cs = hub.device()
    expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    with hubmsg.DeviceClient.from_connection_string(cs, outbox_dir=hub.outbox(device_id)) as dev:
        assert dev.device_id == device_id
        d = dev.send(
            '{"t": 21.5}',
            properties={"unit": "celsius", "seq": "1"},
            message_id="m-1",
            correlation_id="c-1",
            content_type="application/json",
            content_encoding="utf-8",
            expiry=expiry,
        )
        assert d.message_id == "m-1"
        assert d.wait(20) == "delivered"
        assert d.outcome == "delivered" and d.done()
        dev.flush(10)
        st = dev.stats()
        assert st.delivered == 1 and st.depth == 0 and st.connects >= 1
        assert dev.status == "connected"
    [ev] = read_events(service, 1)
    assert ev.body == b'{"t": 21.5}'
    assert ev.message_id == "m-1" and ev.correlation_id == "c-1"
    assert ev.content_type == "application/json" and ev.content_encoding == "utf-8"
    assert ev.properties == {"unit": "celsius", "seq": "1"}
    assert ev.device_id == device_id
    assert ev.system_properties["iothub-connection-device-id"] == device_id
    assert ev.partition >= 0 and ev.sequence_number >= 1
    assert abs((ev.enqueued_time - datetime.datetime.now(datetime.timezone.utc)).total_seconds()) < 60
    exp = ev.expiry_time
    assert exp is not None and abs((exp - expiry).total_seconds()) < 1


def test_send_many_from_several_threads_all_arrive_in_order_per_thread(hub: HubInfo, service: hubmsg.ServiceClient) -> None:
    _, cs = hub.device()
    with hubmsg.DeviceClient.from_connection_string(cs, outbox_dir=hub.outbox("many")) as dev:
        batch = dev.send_many([hubmsg.Message(f"b{i}", message_id=f"b{i}") for i in range(50)] + [b"raw", "text"])
        assert len(batch) == 52 and batch[0].message_id == "b0"

        def sender(t: int) -> None:
            for i in range(100):
                dev.send(f"t{t}-{i}", message_id=f"t{t}-{i}")

        threads = [threading.Thread(target=sender, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dev.flush(30)
        assert all(d.outcome == "delivered" for d in batch)
    events = read_events(service, 452)
    ids = [e.message_id for e in events]
    assert len(set(ids)) == 452
    for t in range(4):
        mine = [int(i.split("-")[1]) for i in ids if i and i.startswith(f"t{t}-")]
        assert sorted(mine) == list(range(100))


def test_outbox_survives_a_restart_of_the_client(hub: HubInfo, service: hubmsg.ServiceClient) -> None:
    _, cs = hub.device()
    ob = hub.outbox("restart")
    down = cs.replace(f"HostName={hub.hub.host_name}", "HostName=127.0.0.1:1")
    with hubmsg.DeviceClient.from_connection_string(down, outbox_dir=ob, retry=hubmsg.RetryPolicy.never()) as dev:
        for i in range(20):
            dev.send(f"offline-{i}", message_id=f"offline-{i}")
        assert dev.stats().depth == 20
        with pytest.raises(hubmsg.HubmsgTimeoutError):
            dev.flush(0.2)
    with hubmsg.DeviceClient.from_connection_string(cs, outbox_dir=ob) as dev:
        assert dev.stats().recovered == 20
        dev.flush(30)
    ids = {e.message_id for e in read_events(service, 20)}
    assert ids == {f"offline-{i}" for i in range(20)}


def test_status_stream_and_failed_status(hub: HubInfo) -> None:
    _, cs = hub.device()
    dev = hubmsg.DeviceClient.from_connection_string(cs, in_memory=True)
    seen = []
    changes = dev.status_changes()
    while True:
        s = changes.next(10)
        assert s is not None
        seen.append(s.status)
        if s.status == "connected":
            break
    dev.close()
    rest = [s.status for s in changes]  # ends after "closed"
    assert rest[-1] == "closed", rest
    bad = cs.rsplit("SharedAccessKey=", 1)[0] + "SharedAccessKey=" + "a2V5a2V5a2V5a2V5"
    with hubmsg.DeviceClient.from_connection_string(bad, in_memory=True) as dev2:
        for s in dev2.status_changes():
            if s.status == "failed":
                assert s.kind == "UNAUTHORIZED", s.reason
                break
        assert dev2.stats().last_error


def test_c2d_receive_iterate_and_settle(hub: HubInfo, service: hubmsg.ServiceClient) -> None:
    device_id, cs = hub.device()
    with hubmsg.DeviceClient.from_connection_string(cs, in_memory=True) as dev:
        assert dev.receive(timeout=0.2) is None  # subscribes; nothing yet
        for i in range(3):
            service.send_c2d(device_id, f"cmd-{i}", message_id=f"cmd-{i}", properties={"n": str(i)})
        got = []
        for msg in dev.messages():
            assert isinstance(msg, hubmsg.C2dMessage) and isinstance(msg, hubmsg.Message)
            assert msg.properties["n"] == msg.message_id.split("-")[1]  # type: ignore[union-attr]
            assert msg.sequence_number > 0 and not msg.settled
            msg.complete()
            assert msg.settled
            got.append(msg.body)
            if len(got) == 3:
                break
        assert got == [b"cmd-0", b"cmd-1", b"cmd-2"]
        assert dev.stats().c2d_received == 3


def test_messages_iteration_ends_when_the_client_closes(hub: HubInfo) -> None:
    _, cs = hub.device()
    dev = hubmsg.DeviceClient.from_connection_string(cs, in_memory=True)
    stream = dev.messages()
    out: list[object] = []
    t = threading.Thread(target=lambda: out.extend(stream))
    t.start()
    dev.close()
    t.join(15)
    assert not t.is_alive() and out == []


def test_host_id_key_options_overflow_drop_oldest_and_retry(hub: HubInfo, service: hubmsg.ServiceClient) -> None:
    device_id, cs = hub.device()
    key = service.get_device(device_id).primary_key
    down = hubmsg.DeviceClient(
        host_name="127.0.0.1:1",
        device_id=device_id,
        key=key,
        in_memory=True,
        max_messages=3,
        overflow="drop_oldest",
        retry=hubmsg.RetryPolicy(initial_delay=0.05, max_delay=0.2, jitter=0.01, max_attempts=2),
        keep_alive=5,
        connect_timeout=2,
    )
    first = down.send(b"0", message_id="0")
    for i in range(1, 5):
        down.send(str(i), message_id=str(i))
    assert first.wait(5) == "dropped"
    st = down.stats()
    assert (st.depth, st.dropped) == (3, 2)
    for s in down.status_changes():
        if s.status == "failed":  # two attempts, then it gives up
            assert s.kind == "DISCONNECTED", s
            break
    down.close()
    with hubmsg.DeviceClient(host_name=hub.hub.host_name, device_id=device_id, key=key, durability="interval:50ms", in_memory=True) as dev:
        assert dev.send(b"up").wait(20) == "delivered"


def test_messages_dropped_by_drop_oldest_stay_dropped_after_a_restart(hub: HubInfo) -> None:
    _, cs = hub.device()
    down = cs.replace(f"HostName={hub.hub.host_name}", "HostName=127.0.0.1:1")
    opts = dict(outbox_dir=hub.outbox("dropped"), retry=hubmsg.RetryPolicy.never())
    with hubmsg.DeviceClient.from_connection_string(down, max_messages=3, overflow="drop_oldest", **opts) as dev:  # type: ignore[arg-type]
        for i in range(5):
            dev.send(str(i), message_id=str(i))
        assert dev.stats().depth == 3
    with hubmsg.DeviceClient.from_connection_string(down, **opts) as dev:  # type: ignore[arg-type]
        assert dev.stats().depth == 3, f"{dev.stats().depth} messages recovered; 2 of them were reported dropped"


def test_without_outbox_dir_the_outbox_is_durable_in_the_default_directory(hub: HubInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    base = hub.root / "default-outboxes"
    monkeypatch.setenv("HUBMSG_OUTBOX_DIR", str(base))
    device_id, cs = hub.device()
    down = cs.replace(f"HostName={hub.hub.host_name}", "HostName=127.0.0.1:1")
    with hubmsg.DeviceClient.from_connection_string(down, retry=hubmsg.RetryPolicy.never()) as dev:
        for i in range(4):
            dev.send(str(i))
    assert (base / "127.0.0.1:1" / device_id).is_dir(), "the outbox lives in HUBMSG_OUTBOX_DIR/<host name>/<device id>"
    with hubmsg.DeviceClient.from_connection_string(down, retry=hubmsg.RetryPolicy.never()) as dev:
        assert dev.stats().recovered == 4, "every accepted message survives in the default outbox"
    with hubmsg.DeviceClient.from_connection_string(down, in_memory=True, retry=hubmsg.RetryPolicy.never()) as dev:
        assert dev.stats().recovered == 0, "in_memory=True keeps nothing on disk"


def test_the_gil_is_released_while_the_engine_waits(hub: HubInfo) -> None:
    _, cs = hub.device()
    with hubmsg.DeviceClient.from_connection_string(cs, in_memory=True) as dev:
        ticks = 0
        stop = threading.Event()

        def spin() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1

        t = threading.Thread(target=spin)
        t.start()
        assert dev.receive(timeout=0.5) is None  # blocks half a second in the engine
        stop.set()
        t.join()
        assert ticks > 10_000, f"the other thread ran only {ticks} times while receive() waited"
