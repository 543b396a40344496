"""A training frame folded in (source, partition) units over worker processes equals the
single-process frame cell for cell, late events, unknown entities and stale rows included."""

from __future__ import annotations

import dataclasses
import random
import uuid
from datetime import datetime, timedelta

import asyncpg
import orjson
import pandas as pd
import pytest

from d2d.eventlog import EventLog
from d2d.features import offline
from d2d.features.definitions import LIFETIME, Aggregate, Aggregation, FeatureView, hours
from d2d.features.fold import fold_all, fold_event
from d2d.features.offline import FrameRow, fold_pages, rows_from_events, source_events, training_frame
from d2d.replay.partition import entity_partition, partitioned_frame, training_frame_on_every_core
from d2d.sim import PaymentsSimulator, SimConfig
from d2d.sim.views import VIEWS

# Arrivals up to three hours late against an hour of allowed lateness: some are dropped.
CONFIG = SimConfig(seed=23, days=0.5, payments_per_day=16_000, out_of_order_fraction=0.08,
                   max_lateness_seconds=3 * 3600)  # fmt: skip


def apart(prefix: str, other: str) -> str:
    """An id of `prefix` in another partition than `other` for 2 and for 3 partitions."""
    return next(
        candidate for i in range(1000)
        if all(entity_partition(candidate := f"{prefix}{i}", n) != entity_partition(other, n) for n in (2, 3))
    )  # fmt: skip


def payment(template, entities: tuple[str, str, str], at: datetime):  # noqa: ANN001, ANN201
    customer, merchant, card = entities
    payload = {**template.payload, "customer_id": customer, "merchant_id": merchant, "card_id": card,
               "payment_id": f"pay_{uuid.uuid4().hex[:12]}"}  # fmt: skip
    return dataclasses.replace(template, event_id=str(uuid.uuid4()), payload=payload, occurred_at=at)


async def load(event_log: EventLog) -> tuple[list, tuple[str, str, str], datetime]:
    """The simulated log, then two payments of new entities in different partitions: Y ten hours
    after the simulated period, then X two hours older than Y (beyond the hour of lateness, but
    newer than anything X's partition holds): only the view-wide newest time drops X, and only it
    makes a query for X as of Y - 2.5 hours stale. Returns (events, X's ids, Y's time)."""
    events = list(PaymentsSimulator(CONFIG).events())
    end = max(e.occurred_at for e in events)
    x = ("cus_x", "mer_x", "card_x")
    y = tuple(apart(f"{name}_y", name) for name in x)
    events += [payment(events[-1], y, end + timedelta(hours=10)), payment(events[-1], x, end + timedelta(hours=8))]
    for i in range(0, len(events), 5000):
        await event_log.append([e.as_new_event() for e in events[i : i + 5000]])
    return events, x, end + timedelta(hours=10)


async def frame_rows(event_log: EventLog, x: tuple[str, str, str], y_at: datetime) -> list[FrameRow]:
    """Rows of every kind: decisions' rows (state just before each payment), rows naming entities
    the log never saw or only some entity types, rows without a watermark, and stale rows (as of a
    time hours behind their watermark's newest event)."""
    candidates = await rows_from_events(event_log, "payment.authorized", VIEWS)
    rng = random.Random(5)
    rows = sorted(rng.sample(candidates, 1500), key=lambda r: r.watermark or 0)
    late = candidates[-1]
    rows += [
        FrameRow({"customer": "cus_nobody", "merchant": late.keys["merchant"], "card": "card_nobody"}, late.as_of),
        FrameRow({"customer": late.keys["customer"]}, late.as_of, late.watermark),
        FrameRow(dict(late.keys), late.as_of - timedelta(hours=5), late.watermark),  # stale
        FrameRow(dict(late.keys), late.as_of + timedelta(minutes=3)),  # watermark resolved from as_of
    ]
    rows += [FrameRow(r.keys, r.as_of) for r in rows[:50]]
    x_keys = dict(zip(("customer", "merchant", "card"), x, strict=True))
    head = await event_log.head()
    rows += [FrameRow(x_keys, y_at, head), FrameRow(x_keys, y_at - timedelta(hours=2.5), head)]
    return rows


@pytest.mark.parametrize("workers", [1, 2, 3])
async def test_partitioned_frame_equals_the_single_process_frame(
    event_log: EventLog, database_url: str, workers: int
) -> None:
    events, x, y_at = await load(event_log)
    folded = [fold_event(i + 1, e.type, 1, e.occurred_at.timestamp(), e.payload) for i, e in enumerate(events)]
    assert fold_all(VIEWS[0], folded).dropped_late > 0  # the log has events every fold refuses
    rows = await frame_rows(event_log, x, y_at)
    single = await training_frame(event_log, VIEWS, rows)
    assert single["stale"].sum() >= 2 and (single["unknown_entities"] != "").sum() >= 2
    assert single["unknown_entities"].iloc[-2] == "customer,merchant,card"  # X came too late
    assert single["stale"].iloc[-1]

    parted = await partitioned_frame(database_url, VIEWS, rows, workers=workers, role="d2d_registry")

    assert list(parted.columns) == list(single.columns)
    assert list(parted.dtypes) == list(single.dtypes)
    pd.testing.assert_frame_equal(parted, single, check_exact=True)


async def test_the_key_text_a_unit_reads_is_the_entity_id_the_fold_uses(database_url: str) -> None:
    """Units partition by the entity key's text as Postgres writes it (one MD5 per entity, in the
    worker); for string and integer keys that text is the fold's entity id (`str` of the value)."""
    keys = ["cus_000001", "", "é-ü-ß", "商户-42", "a" * 200, "12345", 0, -7, 12345, 2**62, '"quoted"']
    conn = await asyncpg.connect(database_url)
    try:
        texts = await conn.fetch(
            "SELECT p::jsonb #>> $2 FROM unnest($1::text[]) WITH ORDINALITY AS t(p, i) ORDER BY i",
            [orjson.dumps({"k": {"id": key}}).decode() for key in keys], ["k", "id"],
        )  # fmt: skip
    finally:
        await conn.close()
    assert [r[0] for r in texts] == [str(key) for key in keys]


async def test_training_frames_use_every_core_with_the_same_result(event_log: EventLog) -> None:
    events, x, y_at = await load(event_log)
    rows = await frame_rows(event_log, x, y_at)

    everywhere = await training_frame_on_every_core(event_log, VIEWS, rows, min_events=0)

    pd.testing.assert_frame_equal(everywhere, await training_frame(event_log, VIEWS, rows), check_exact=True)


async def test_a_view_keyed_on_numbers_postgres_writes_otherwise_is_partitioned_in_python_alike(
    event_log: EventLog, database_url: str
) -> None:
    by_amount = FeatureView(
        name="amount_payments", entity="amount", entity_key="amount", source="payment.authorized",
        aggregates=(Aggregate("count", Aggregation.COUNT, windows=(hours(1), LIFETIME)),),
        allowed_lateness_seconds=3600,
    )  # fmt: skip
    events, x, y_at = await load(event_log)
    payments = [(seq, e) for seq, e in enumerate(events, 1) if e.type == "payment.authorized"]
    rows = [FrameRow({"amount": str(e.payload["amount"])}, e.occurred_at, seq) for seq, e in payments[::40]]
    assert any(isinstance(e.payload["amount"], float) for _, e in payments)  # floats: 1e-05 in Python

    parted = await partitioned_frame(database_url, [by_amount], rows, workers=2)

    single = await training_frame(event_log, [by_amount], rows)
    assert (single["amount_payments.count_lifetime"] > 0).sum() > len(rows) / 2
    pd.testing.assert_frame_equal(parted, single, check_exact=True)


async def test_payments_without_an_entity_key_fold_alike_in_partitions(event_log: EventLog, database_url: str) -> None:
    """A payment whose customer key is missing or null folds into no customer but still counts for
    the merchant and card views, and never moves the customer view's newest time: the same on
    every path, however the keys of the others are partitioned."""
    events, x, y_at = await load(event_log)
    keyless = []
    for i, minutes in enumerate((30, 50, 5, 70)):  # one older than the newest, inside the lateness
        event = payment(events[-3], ("cus_unused", f"mer_k{i}", f"card_k{i}"), y_at + timedelta(minutes=minutes))
        payload = dict(event.payload)
        if i % 2:
            payload["customer_id"] = None
        else:
            del payload["customer_id"]
        keyless.append(dataclasses.replace(event, payload=payload))
    await event_log.append([e.as_new_event() for e in keyless])
    head = await event_log.head()
    at = y_at + timedelta(hours=2)
    rows = [
        FrameRow({"merchant": f"mer_k{i}", "card": f"card_k{i}", "customer": "cus_unused"}, at, head) for i in range(4)
    ]
    rows += (await frame_rows(event_log, x, y_at))[:200]

    single = await training_frame(event_log, VIEWS, rows)
    assert (single["merchant_payments.count_1d"].iloc[:4] == 1).all()
    assert (single["unknown_entities"].iloc[:4] == "customer").all()

    parted = await partitioned_frame(database_url, VIEWS, rows, workers=2, role="d2d_registry")

    pd.testing.assert_frame_equal(parted, single, check_exact=True)


async def test_the_frame_reader_gives_the_folds_events_of_the_stored_log(
    event_log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fold_pages` (the frame's narrow reader) yields exactly what `fold_event` makes of each
    stored event of the types asked, event times included, in seq order, page after page, and
    stops at `to_seq` when given."""
    await load(event_log)
    monkeypatch.setattr(offline, "PAGE", 1000)
    types = ["payment.authorized", "card.issued"]
    read = [event async for page in fold_pages(event_log, types) for event in page]
    stored = [
        fold_event(e.seq, e.type, e.schema_version, e.occurred_at.timestamp(), e.payload)
        async for e in source_events(event_log, types)
    ]
    assert len(read) > 5 * offline.PAGE and {e.type for e in read} == set(types)
    assert read == stored
    to_seq = read[2 * offline.PAGE + 17].seq  # inside a page: the rest of it is left out
    upto = [event async for page in fold_pages(event_log, types, to_seq) for event in page]
    assert upto == [e for e in stored if e.seq <= to_seq] and upto[-1].seq == to_seq
