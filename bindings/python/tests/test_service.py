"""Service side through an embedded hub: identities, C2D complete / abandon / reject with
ack="full" feedback, the feedback stream, purge, a released (garbage-collected) message,
consumer groups with checkpoints, several readers sharing a group's partitions."""

from __future__ import annotations

import gc
import threading

import pytest

import hubmsg
from conftest import HubInfo


def test_identities(service: hubmsg.ServiceClient) -> None:
    d = service.create_device("pump-1")
    assert d.device_id == "pump-1" and d.enabled and d.status == "enabled" and d.primary_key
    assert service.get_device("pump-1").generation_id == d.generation_id
    service.create_device("pump-2", primary_key=d.secondary_key, secondary_key=d.primary_key, enabled=False)
    assert [x.device_id for x in service.list_devices()] == ["pump-1", "pump-2"]
    assert not service.get_device("pump-2").enabled
    assert service.enable_device("pump-2").enabled
    assert not service.disable_device("pump-1").enabled
    assert service.regenerate_keys("pump-1", "primary").primary_key != d.primary_key
    cs = service.device_connection_string("pump-2")
    assert "DeviceId=pump-2" in cs and d.secondary_key in cs
    service.delete_device("pump-1")
    with pytest.raises(hubmsg.NotFoundError):
        service.get_device("pump-1")


def settle_commands(cs: str, n: int) -> threading.Thread:
    """A device that completes "ok-*", rejects "bad-*" and abandons "retry-*" commands."""

    def run() -> None:
        with hubmsg.DeviceClient.from_connection_string(cs, in_memory=True) as dev:
            done = 0
            while done < n:
                msg = dev.receive(timeout=20)
                assert msg is not None
                body = msg.body.decode()
                if body.startswith("ok"):
                    msg.complete()
                elif body.startswith("bad"):
                    msg.reject()
                else:
                    msg.abandon()
                done += 1

    t = threading.Thread(target=run)
    t.start()
    return t


def test_c2d_complete_reject_with_full_feedback(hub: HubInfo, service: hubmsg.ServiceClient) -> None:
    device_id, cs = hub.device()
    t = settle_commands(cs, 2)
    ok = service.send_c2d_and_wait(device_id, "ok-1", ack="full", timeout=20)
    assert ok.status == "Success" and ok.device_id == device_id and ok.original_message_id
    bad = service.send_c2d_and_wait(device_id, "bad-1", message_id="bad-1", timeout=20)
    assert (bad.status, bad.original_message_id, bad.description) == ("Rejected", "bad-1", "Rejected")
    t.join(20)


def test_c2d_abandon_redelivers_and_the_feedback_stream_reports_outcomes(hub: HubInfo, service: hubmsg.ServiceClient) -> None:
    device_id, cs = hub.device()
    receipt = service.send_c2d(device_id, "retry-then-ok", ack="full", message_id="cmd-a", ttl=60)
    assert receipt.message_id == "cmd-a" and receipt.sequence_number > 0
    with hubmsg.DeviceClient.from_connection_string(cs, in_memory=True) as dev:
        first = dev.receive(20)
        assert first is not None and first.message_id == "cmd-a"
        first.abandon()
        again = dev.receive(20)
        assert again is not None and again.message_id == "cmd-a"
        again.complete()
        stream = service.feedback()
        statuses = []
        while not statuses:
            batch = stream.next(20)
            assert batch is not None
            statuses += [(r.original_message_id, r.status) for r in batch.records]
            batch.ack()
        assert ("cmd-a", "Success") in statuses


def test_an_unsettled_message_that_is_garbage_collected_is_delivered_again(hub: HubInfo, service: hubmsg.ServiceClient) -> None:
    device_id, cs = hub.device()
    service.send_c2d(device_id, "forgotten", message_id="gc-1")
    with hubmsg.DeviceClient.from_connection_string(cs, in_memory=True) as dev:
        msg = dev.receive(20)
        assert msg is not None and msg.message_id == "gc-1"
        del msg
        gc.collect()
        # The hub's lock is 1 s in these tests (60 s by default): then it delivers it again.
        again = dev.receive(20)
        assert again is not None and again.message_id == "gc-1"
        again.complete()


def test_purge(hub: HubInfo, service: hubmsg.ServiceClient) -> None:
    device_id, _ = hub.device()
    for i in range(3):
        service.send_c2d(device_id, f"p{i}", ack="negative")
    assert service.purge_c2d(device_id) == 3
    assert service.purge_c2d(device_id) == 0
    statuses: list[str] = []
    stream = service.feedback()
    while len(statuses) < 3:
        batch = stream.next(20)
        assert batch is not None
        statuses += [r.status for r in batch.records]
        batch.ack()
    assert statuses == ["Purged"] * 3


def send(cs: str, n: int, prefix: str) -> None:
    with hubmsg.DeviceClient.from_connection_string(cs, in_memory=True) as dev:
        dev.send_many([hubmsg.Message(f"{prefix}{i}", message_id=f"{prefix}{i}") for i in range(n)])
        dev.flush(30)


def test_consumer_group_checkpoint_resumes_after_acked_events(hub: HubInfo, service: hubmsg.ServiceClient) -> None:
    _, cs = hub.device()
    send(cs, 10, "e")
    with service.events("audit", start="earliest") as stream:
        for _ in range(6):
            ev = stream.next(20)
            assert ev is not None
            ev.ack()
        stream.checkpoint()
    send(cs, 2, "late")
    # The group resumes after the 6 acknowledged events; another group starts where it asks.
    with service.events("audit") as stream:
        rest = []
        while len(rest) < 6:
            ev = stream.next(20)
            assert ev is not None
            ev.ack()
            rest.append(ev.message_id)
        assert rest == ["e6", "e7", "e8", "e9", "late0", "late1"]
        assert stream.next(0.3) is None
    with service.events("fresh", start="latest") as stream:
        assert stream.next(0.3) is None
    with service.events("from-seq", start=9) as stream:
        ev = stream.next(20)
        assert ev is not None and ev.sequence_number >= 9


def test_two_readers_in_one_group_share_the_partitions(hub: HubInfo, service: hubmsg.ServiceClient) -> None:
    devices = [hub.device() for _ in range(8)]
    a = service.events("shared", start="earliest")
    b = service.events("shared", start="earliest")
    for i, (_, cs) in enumerate(devices):
        send(cs, 5, f"d{i}-")
    seen: dict[str, set[int]] = {"a": set(), "b": set()}
    ids: set[str] = set()
    for _ in range(400):
        for name, s in (("a", a), ("b", b)):
            ev = s.next(0.05)
            if ev is not None:
                ev.ack()
                seen[name].add(ev.partition)
                assert ev.message_id is not None
                ids.add(ev.message_id)
        if len(ids) == 40:
            break
    a.close()
    b.close()
    assert len(ids) == 40
    assert seen["a"] and seen["b"] and not (seen["a"] & seen["b"]), seen


def test_events_from_a_point_in_time(hub: HubInfo, service: hubmsg.ServiceClient) -> None:
    import datetime

    _, cs = hub.device()
    send(cs, 3, "old")
    with service.events("probe", start="earliest") as s:
        last_old = None
        for _ in range(3):
            last_old = s.next(20)
            assert last_old is not None
    send(cs, 2, "new")
    assert last_old is not None
    since = datetime.datetime.fromtimestamp((last_old.enqueued_time_ms + 1) / 1000, datetime.timezone.utc)
    with service.events("since", start=since) as s:
        got = []
        while len(got) < 2:
            ev = s.next(20)
            assert ev is not None
            got.append(ev.message_id)
        assert sorted(got) == ["new0", "new1"]
        assert s.next(0.3) is None
