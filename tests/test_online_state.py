"""The features service's online state folds only its views' source types, each checked against the
previous event of its type that the relay names, so a missed event is a gap and never a silent hole;
its watermark claims only what it folded."""

from __future__ import annotations

import uuid
import zlib
from datetime import UTC, datetime

import orjson
import pytest

from d2d import bus
from d2d.bus import Topology
from d2d.eventlog import EventLog, NewEvent
from d2d.features.consumer import Folder
from d2d.features.online import GapError, OnlineState
from d2d.runtime.servers import NatsServer
from d2d.sim.views import VIEWS

SOURCE = "payment.authorized"


def envelope(seq: int, customer: str = "c1", amount: float = 10.0) -> bytes:
    payload = {"customer_id": customer, "merchant_id": "m1", "card_id": "k1", "amount": amount, "channel": "ecom",
               "ip_country": "DE", "device_id": "d1"}  # fmt: skip
    return orjson.dumps({"seq": seq, "type": SOURCE, "schema_version": 1,
                         "occurred_at": f"2026-01-01T00:00:{seq:02d}+00:00", "payload": payload})  # fmt: skip


def test_events_chain_by_type_and_the_watermark_follows_the_last_folded() -> None:
    state = OnlineState(VIEWS)
    assert state.sources == [SOURCE]
    assert state.offer(3, SOURCE, envelope(3), stream_seq=3, prev=0)  # seqs 1, 2 were other types
    assert state.offer(7, SOURCE, envelope(7), stream_seq=7, prev=3)
    assert state.watermark == 7 and state.last_of_type[SOURCE] == 7
    assert not state.offer(7, SOURCE, envelope(7), stream_seq=7, prev=3), "a redelivery changes nothing"
    assert state.states["customer_payments"].values("c1", 1767225660.0)["count_lifetime"] == 2


def test_a_missed_event_of_the_type_is_a_gap_not_a_hole() -> None:
    state = OnlineState(VIEWS)
    state.offer(3, SOURCE, envelope(3), prev=0)
    with pytest.raises(GapError) as gap:
        state.offer(9, SOURCE, envelope(9), prev=5)  # 5 was never folded
    assert (gap.value.type, gap.value.after, gap.value.through) == (SOURCE, 3, 5)
    assert state.watermark == 3, "nothing past the gap is claimed"
    state.offer_event(5, SOURCE, 1, 1767225605.0, orjson.loads(envelope(5))["payload"])  # filled from the log
    assert state.offer(9, SOURCE, envelope(9), prev=5)
    assert state.states["customer_payments"].values("c1", 1767225660.0)["count_lifetime"] == 3


def test_other_types_are_refused_and_idle_advance_only_moves_forward() -> None:
    state = OnlineState(VIEWS)
    with pytest.raises(ValueError, match="no view folds"):
        state.offer(1, "decision.made", b"{}", prev=0)
    state.offer(4, SOURCE, envelope(4), stream_seq=4, prev=0)
    state.advance(10, 10)  # the stream's last message (a decision, say) is at seq 10
    assert (state.watermark, state.stream_seq) == (10, 10)
    state.advance(8, 8)
    assert (state.watermark, state.stream_seq) == (10, 10)


def test_snapshot_keeps_the_chain_and_refuses_one_without_it() -> None:
    state = OnlineState(VIEWS)
    state.offer(4, SOURCE, envelope(4), stream_seq=4, prev=0)
    restored = OnlineState.from_bytes(VIEWS, state.to_bytes(), 4)
    assert restored.last_of_type == {SOURCE: 4} and restored.watermark == 4
    with pytest.raises(GapError):
        restored.offer(9, SOURCE, envelope(9), prev=6)
    old = orjson.loads(zlib.decompress(state.to_bytes()))
    del old["last_of_type"]
    with pytest.raises(ValueError, match="predates"):
        OnlineState.from_bytes(VIEWS, zlib.compress(orjson.dumps(old)), 4)


async def test_idle_advance_waits_for_a_delivered_message_it_has_not_folded(
    nats_server: NatsServer, event_log: EventLog, namespace: str
) -> None:
    """A pull request that expired on the client can still be served: its message then sits in the
    client's queue, no longer pending on the server. The idle check must not move the watermark
    past it (a Predict would log a watermark whose state it did not read)."""
    topology = Topology(namespace)
    now = datetime.now(UTC)  # the log holds seqs 1-6, as the messages below claim (none may claim more)
    await event_log.append([NewEvent(uuid.uuid4(), "test.filler", 1, "t", str(i), now, "{}") for i in range(6)])
    nc = await bus.connect(nats_server.url, name="test-idle-advance")
    try:
        folder = Folder(nc, event_log, OnlineState(VIEWS), consumer=f"{namespace}-features", topology=topology)
        js = nc.jetstream()
        sub = await folder.subscribe(js)
        prefix, stream = topology.events_prefix, topology.events_stream
        await js.publish(f"{prefix}.{SOURCE}", envelope(5), headers={"D2D-Seq": "5", "D2D-Prev-Of-Type": "0"})
        await js.publish(f"{prefix}.decision.made", b"{}", headers={"D2D-Seq": "6", "D2D-Prev-Of-Type": "0"})
        (delivered,) = await sub.fetch(1, timeout=5)  # delivered, not folded yet

        await folder._advance_when_idle(js, stream)
        assert folder.state.watermark == 0, "the watermark moved past a delivered, unfolded payment"

        folder.state.offer(5, SOURCE, delivered.data, delivered.metadata.sequence.stream, prev=0)
        await folder._advance_when_idle(js, stream)
        assert folder.state.watermark == 6, "folded and nothing pending: the stream's last position"
    finally:
        await nc.close()
