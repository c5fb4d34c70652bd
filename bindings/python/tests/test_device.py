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
