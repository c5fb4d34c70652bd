"""hubmsg.aio: the D2C and C2D paths with async methods and async for, many outstanding sends,
and cancellation of a pending await losing nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import hubmsg
import hubmsg.aio
from conftest import HubInfo


async def test_d2c_and_events_async(hub: HubInfo) -> None:
    _, cs = hub.device()
    async with await hubmsg.aio.DeviceClient.from_connection_string(cs, outbox_dir=hub.outbox("aio")) as dev:
        deliveries = await asyncio.gather(*(dev.send(f"m{i}", message_id=f"m{i}", properties={"i": str(i)}) for i in range(200)))
        more = await dev.send_many([f"n{i}" for i in range(10)])
        outcomes = await asyncio.gather(*(d.wait_async(20) for d in deliveries + more))
        assert set(outcomes) == {"delivered"}
        await dev.flush(10)
        assert dev.stats().delivered == 210
    async with await hubmsg.aio.ServiceClient.from_connection_string(hub.service_cs) as svc:
        stream = await svc.events("$Default", start="earliest")
        ids = set()
        async for ev in stream:
            ev.ack()
            assert ev.message_id is not None
            ids.add(ev.message_id)
            if len(ids) == 210:
                break
        await stream.checkpoint_async()
        await stream.close_async()
        assert {f"m{i}" for i in range(200)} <= ids


async def test_c2d_async_with_feedback(hub: HubInfo) -> None:
    device_id, cs = hub.device()
    async with await hubmsg.aio.ServiceClient.from_connection_string(hub.service_cs) as svc:
        assert (await svc.get_device(device_id)).device_id == device_id
        async with await hubmsg.aio.DeviceClient.from_connection_string(cs, in_memory=True) as dev:

            async def device_side() -> list[bytes]:
                got = []
                async for msg in dev.messages():
                    got.append(msg.body)
                    if msg.body == b"reject me":
                        msg.reject()
                    else:
                        msg.complete()
                    if len(got) == 2:
                        return got
                return got

            task = asyncio.create_task(device_side())
            ok, bad = await asyncio.gather(
                svc.send_c2d_and_wait(device_id, "do it", timeout=20), svc.send_c2d_and_wait(device_id, "reject me", timeout=20)
            )
            assert (ok.status, bad.status) == ("Success", "Rejected")
            assert sorted(await task) == [b"do it", b"reject me"]


async def test_cancelling_a_pending_receive_loses_no_message(tmp_path: Path) -> None:
    # A 30 s lock: a message handed to a cancelled await and dropped would come back only after
    # the test gave up waiting for it (20 s), so dropping one cannot pass unnoticed.
    hub = hubmsg.Hub(tmp_path / "hub", lock_timeout=30)
    device_id = "canceller"
    cs = hub.create_device(device_id)
    async with await hubmsg.aio.ServiceClient.from_connection_string(hub.service_connection_string) as svc:
        async with await hubmsg.aio.DeviceClient.from_connection_string(cs, in_memory=True) as dev:
            # Many receives cancelled while they wait, some right as a message arrives.
            seen_early: set[str | None] = set()
            for i in range(20):
                pending = asyncio.create_task(dev.receive())
                await asyncio.sleep(0.01)
                if i % 4 == 0:
                    await svc.send_c2d(device_id, f"c{i}", message_id=f"c{i}")
                pending.cancel()
                try:
                    msg = await pending
                except asyncio.CancelledError:
                    continue
                assert msg is not None
                msg.complete()  # it won the race: it was handed over, not lost
                seen_early.add(msg.message_id)
            got = set(seen_early)
            while len(got) < 5:
                msg = await asyncio.wait_for(dev.receive(), 20)
                assert msg is not None and msg.message_id not in got
                msg.complete()
                got.add(msg.message_id)
            assert got == {f"c{i}" for i in range(0, 20, 4)}
    hub.shutdown()


async def test_cancelling_a_pending_event_read_loses_no_event(hub: HubInfo) -> None:
    _, cs = hub.device()
    async with await hubmsg.aio.ServiceClient.from_connection_string(hub.service_cs) as svc:
        stream = await svc.events("cancel", start="earliest")
        pending = asyncio.ensure_future(stream.next_async())
        await asyncio.sleep(0.05)
        pending.cancel()
        async with await hubmsg.aio.DeviceClient.from_connection_string(cs, in_memory=True) as dev:
            await dev.send("after-cancel", message_id="after-cancel")
            await dev.flush(10)
        ev = await stream.next_async(20)
        assert ev is not None and ev.message_id == "after-cancel"
        await stream.close_async()


async def test_cancelled_sends_are_queued_whole_and_delivered(hub: HubInfo) -> None:
    _, cs = hub.device()
    async with await hubmsg.aio.DeviceClient.from_connection_string(cs, outbox_dir=hub.outbox("cancel-send")) as dev:
        for _ in range(5):
            tasks = [asyncio.ensure_future(dev.send(f"s{i}")) for i in range(50)]
            await asyncio.sleep(0)  # every send has started (its message is being written)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # A cancelled send may or may not have queued its message, never half of it, and
            # what it queued is delivered without another send having to come along.
            await dev.flush(10)
        assert dev.stats().depth == 0
