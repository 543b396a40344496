"""Faults under load: nothing acknowledged is lost or duplicated, and no single input stops the platform.

`python -m bench.faults [--quick]` starts real Postgres and NATS and the five processes `d2d up` runs
(ingest, relay, features, registry, serving), loads a simulated log, trains and promotes a model,
then drives a steady load — producers appending payments through ingest, applications calling
Predict, each retrying failed calls with the same event ids and request ids as a real client
would — in two phases of equal length:

1. **baseline**: no faults; the load's throughput here is the baseline the fault phase is compared with;
2. **faults**: each of ingest, relay, features, registry, serving, NATS and Postgres is killed with
   SIGKILL in turn (and restarted, as `d2d up` restarts a child that dies), and a poison input of
   each kind the robustness issue found is sent (NUL characters in ids, metadata and payloads, an
   event dated 9999-12-31, a timestamp past year 9999, 2 MiB of metadata, a 15 MiB payload, a
   payload at the size limit, garbage and NUL bodies on the NATS intake, NaN / a string / a list /
   2 MiB in a Predict context).

Then it waits for the platform to settle and counts, from the log and the stream: events
acknowledged (answered with a position) and found in the log, lost (acknowledged, not in the log)
and duplicated (in the log or on the stream more than once); Predicts answered, decisions logged and
withdrawn; how each poison input was answered (a precise status, never UNKNOWN or INTERNAL). The last
line is one JSON object with every figure; `load_held` is the fault phase's acknowledged events per
second over the baseline's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import nats

from bench._common import Servers, Services, bench_dir, emit, machine, parser, say, stop_on_sigterm, wait_until
from bench.serving import MODEL, build_workload, default_spec, load_log
from d2d.client import IngestClient, RegistryClient, ServingClient, make_event
from d2d.limits import MAX_EVENT_BYTES
from d2d.runtime.servers import free_port
from d2d.runtime.services import SERVICES
from d2d.runtime.supervisor import Backoff
from d2d.sim import SimConfig, load_contracts
from d2d.v1 import event_pb2, serving_pb2

QUICK_SIM = SimConfig(seed=5, days=35, payments_per_day=250, customers=300, merchants=40)
FULL_SIM = SimConfig(seed=5, days=35, payments_per_day=600, customers=500, merchants=50)
QUICK_PHASE, FULL_PHASE = 14.0, 42.0  # seconds per phase; the fault phase injects 7 kills and the poisons
PRODUCERS, APPLICATIONS = 4, 8  # concurrent appenders (batches of BATCH events) and Predict callers
BATCH = 50
CALL_TIMEOUT = 5.0
SETTLE_TIMEOUT = 180.0
CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
FAULTED = (*(spec.name for spec in SERVICES), "nats", "postgres")  # killed in this order
RESTART_DELAY = 0.5  # a short, constant backoff: the servers may still be coming back


def restart_policy() -> Backoff:
    return Backoff(first=RESTART_DELAY, cap=RESTART_DELAY)


SKIPPED_SQL = "SELECT count(*) FROM events WHERE type = 'quality.alert' AND payload->>'kind' = 'event_not_published'"


@dataclass
class Load:
    """What the load generators saw."""

    acknowledged: set[str] = field(default_factory=set)  # event ids answered with a position
    appended_in_phase: Counter[str] = field(default_factory=Counter)
    append_errors: Counter[str] = field(default_factory=Counter)
    predicts_answered: int = 0
    predicts_in_phase: Counter[str] = field(default_factory=Counter)
    predict_errors: Counter[str] = field(default_factory=Counter)
    phase: str = "warmup"
    stopping: bool = False


class Platform:
    """The registered services, restarted when they die (as `d2d up` does, by the same supervisor,
    after `RESTART_DELAY`), and the servers."""

    def __init__(self, servers: Servers, services: Services, env: dict[str, str]) -> None:
        self.servers = servers
        self.services = services
        for spec in SERVICES:
            services.start(spec.name, spec.args, env)
        self.server_restarts: Counter[str] = Counter()

    @property
    def restarts(self) -> Counter[str]:
        return Counter({c.name: c.restarts for c in self.services.children if c.restarts}) + self.server_restarts

    async def supervise(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.services.watch_once()
            await asyncio.sleep(0.1)

    async def kill(self, name: str) -> None:
        """SIGKILL one component; servers are restarted here, services by `supervise`."""
        if any(spec.name == name for spec in SERVICES):
            os.kill(self.services.child(name).process.pid, signal.SIGKILL)
            return
        server = self.servers.nats if name == "nats" else self.servers.postgres
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        await asyncio.sleep(1.0)
        for attempt in range(20):  # Postgres' backends notice their postmaster's death within moments
            try:
                await asyncio.to_thread(server.start)
                break
            except Exception as exc:
                if attempt == 19:
                    raise
                say(f"  {name} restart failed ({str(exc).splitlines()[0]}); retrying")
                await asyncio.sleep(0.5)
        self.server_restarts[name] += 1


def payment_events(workload_payments: list[dict[str, Any]], start: datetime, producer: int, n: int) -> list[Any]:
    """`n` new payments (fresh ids) shaped like the simulator's, in event time after `start`."""
    events = []
    for k in range(n):
        base = workload_payments[(producer * 7919 + k) % len(workload_payments)]
        payment_id = f"pay_{uuid.uuid4().int % 10**16:016d}"  # the contract's pattern, never a simulated id
        payload = {**base, "payment_id": payment_id}
        events.append(
            make_event(
                "payment.authorized", "payment", payment_id, payload, occurred_at=start + timedelta(milliseconds=k)
            )  # fmt: skip
        )
    return events


async def producer(ingest: IngestClient, load: Load, payments: list[dict[str, Any]], start: datetime, i: int) -> None:
    """Append batches; a failed call is retried with the same events until answered (idempotent)."""
    while not load.stopping:
        batch = payment_events(payments, start, i, BATCH)
        while True:
            try:
                answer = await ingest.append(batch, timeout=CALL_TIMEOUT)
                break
            except grpc.aio.AioRpcError as exc:
                load.append_errors[exc.code().name] += 1
                await asyncio.sleep(0.2)
        for result in answer.results:
            if result.WhichOneof("outcome") == "seq":
                load.acknowledged.add(result.event_id)
                load.appended_in_phase[load.phase] += 1
            else:
                load.append_errors[f"refused {result.error.code}"] += 1


async def application(serving: ServingClient, load: Load, requests: list[serving_pb2.PredictRequest], i: int) -> None:
    """Call Predict; a failed call is retried with the same request id (at most 20 tries)."""
    n = 0
    while not load.stopping:
        request = serving_pb2.PredictRequest()
        request.CopyFrom(requests[(i * 104_729 + n) % len(requests)])
        request.request_id = f"app{i}-{n}"
        n += 1
        for _ in range(20):
            try:
                await serving.stub.Predict(request, timeout=CALL_TIMEOUT)
                load.predicts_answered += 1
                load.predicts_in_phase[load.phase] += 1
                break
            except grpc.aio.AioRpcError as exc:
                load.predict_errors[exc.code().name] += 1
                await asyncio.sleep(0.2)


async def send_poisons(
    ingest: IngestClient, serving: ServingClient, nats_url: str, prefix: str, request: serving_pb2.PredictRequest
) -> dict[str, str]:
    """Each poison input once; how it was answered (a status code name, or the event's outcome)."""
    now = datetime.now(UTC)
    answers: dict[str, str] = {}

    def payment(**overrides: Any) -> event_pb2.Event:
        payload = {"payment_id": "pay_poison", "customer_id": "cus_000001", "card_id": "card_000001_1",
                   "merchant_id": "mer_0001", "amount": 1.0, "currency": "EUR", "channel": "ecom",
                   "ip_country": "DE", "device_id": "dev_0123456789ab"}  # fmt: skip
        kwargs: dict[str, Any] = {"occurred_at": now}
        for key in ("occurred_at", "metadata"):
            if key in overrides:
                kwargs[key] = overrides.pop(key)
        raw = overrides.pop("raw", None)
        payload.update(overrides)
        return make_event("payment.authorized", "payment", "pay_poison", raw or payload, **kwargs)

    far = payment(occurred_at=datetime(9999, 12, 31, tzinfo=UTC))
    past_9999 = payment()
    past_9999.occurred_at.seconds = 253_402_300_800 + 86_400
    nul_id = payment()
    nul_id.entity_id = "pay\x00poison"
    at_limit = make_event(  # under a contract that takes any object: only the size limit applies
        "bench.blob", "blob", "b1", b'{"s":"' + b"x" * (MAX_EVENT_BYTES - 100) + b'"}', occurred_at=now
    )
    cases = {
        "nul in entity_id": nul_id,
        "nul in metadata": payment(metadata={"note": "a\x00b"}),
        "nul in payload": payment(device_id="dev\x00x"),
        "occurred_at 9999-12-31": far,
        "timestamp past year 9999": past_9999,
        "2 MiB of metadata": payment(metadata={"blob": "m" * (2 << 20)}),
        "15 MiB payload": payment(raw=b'{"s":"' + b"x" * (15 << 20) + b'"}'),
        "payload just under the size limit (accepted)": at_limit,
    }
    for name, event in cases.items():
        try:
            [result] = (await ingest.append([event], timeout=30)).results
            answers[name] = "OK" if result.WhichOneof("outcome") == "seq" else CODE_NAMES[result.error.code]
        except grpc.aio.AioRpcError as exc:
            answers[name] = exc.code().name
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.publish(f"{prefix}.payment.authorized", b"\x00garbage")
        envelope = {"event_id": str(uuid.uuid4()), "entity_type": "payment", "entity_id": "pay\u0000x",
                    "occurred_at": now.isoformat(), "payload": {}}  # fmt: skip
        await js.publish(f"{prefix}.payment.authorized", json.dumps(envelope).encode())
        answers["nats: garbage and NUL bodies"] = "published (kept in dead letters by ingest)"
    finally:
        await nc.close()
    for name, value in {
        "predict context NaN": float("nan"), "predict context 'abc'": "abc", "predict context list": [1, 2],
        "predict context 2 MiB": "c" * (2 << 20),
    }.items():  # fmt: skip
        bad = serving_pb2.PredictRequest()
        bad.CopyFrom(request)
        bad.context["amount"] = value  # type: ignore[index]
        try:
            await serving.stub.Predict(bad, timeout=30)
            answers[name] = "OK (a decision)"
        except grpc.aio.AioRpcError as exc:
            answers[name] = exc.code().name
    return answers


async def run(quick: bool, servers: Servers, services: Services, tmp: Path) -> dict[str, Any]:
    config = QUICK_SIM if quick else FULL_SIM
    phase_seconds = QUICK_PHASE if quick else FULL_PHASE
    workload = build_workload(config)
    token = f"f{uuid.uuid4().hex[:8]}"
    url = await servers.new_database(f"{token}_faults")
    await load_log(url, workload.events)
    say(f"log loaded: {len(workload.events):,} simulated events")
    ports = {name: free_port() for name in ("ingest", "features", "registry", "serving")}
    env = {
        "D2D_DATABASE_URL": url, "D2D_NATS_URL": servers.nats.url, "D2D_NATS_NAMESPACE": token,
        "D2D_DATA_DIR": str(tmp / "data"),
        **{f"D2D_{name.upper()}_ADDR": f"127.0.0.1:{port}" for name, port in ports.items()},
    }  # fmt: skip
    platform = Platform(servers, services, env)
    ingest = IngestClient(env["D2D_INGEST_ADDR"])
    registry = RegistryClient(env["D2D_REGISTRY_ADDR"])
    serving = ServingClient(env["D2D_SERVING_ADDR"])
    stop_supervising = asyncio.Event()
    supervisor = asyncio.create_task(platform.supervise(stop_supervising))
    load = Load()
    try:
        for client in (ingest, registry, serving):
            await client.wait_ready(timeout=120)
        for spec in load_contracts():
            await ingest.create_contract_version(
                spec.event_type, owner=spec.owner, json_schema=spec.schema, pii_fields=spec.pii_fields,
                compatibility=spec.compatibility,
            )  # fmt: skip
        any_object = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}
        await ingest.create_contract_version("bench.blob", owner="bench.faults", json_schema=any_object)
        await registry.create_model(MODEL, "bench.faults")
        version = await registry.train(MODEL, json.dumps(default_spec().to_dict()))
        await registry.set_alias(MODEL, "production", version.name.rsplit("/", 1)[1])
        say(f"model {version.name} trained and promoted")

        payments = [json.loads(e.payload) for e in workload.events if e.type == "payment.authorized"][-500:]
        start = datetime.fromisoformat(workload.now)
        workers = [asyncio.create_task(producer(ingest, load, payments, start, i)) for i in range(PRODUCERS)]
        workers += [asyncio.create_task(application(serving, load, workload.requests, i)) for i in range(APPLICATIONS)]
        await asyncio.sleep(2.0)  # warm up
        load.phase = "baseline"
        say(f"baseline: {phase_seconds:.0f}s of load without faults")
        await asyncio.sleep(phase_seconds)
        load.phase = "faults"
        faults = list(FAULTED)
        interval = phase_seconds / (len(faults) + 1)
        poisons: dict[str, str] = {}
        say(f"faults: SIGKILL each of {', '.join(faults)} in turn, every {interval:.1f}s, and every poison input")
        phase_started = time.monotonic()
        poisons = await send_poisons(ingest, serving, servers.nats.url, f"{token}.d2d.in", workload.requests[0])
        for name in faults:
            await asyncio.sleep(max(0.0, phase_started + interval * (faults.index(name) + 1) - time.monotonic()))
            say(f"  kill -9 {name}")
            await platform.kill(name)
        await asyncio.sleep(max(0.0, phase_seconds - (time.monotonic() - phase_started)))
        load.phase = "after"
        load.stopping = True
        await asyncio.wait_for(asyncio.gather(*workers), SETTLE_TIMEOUT)
        say("load stopped; waiting for the relay to publish the whole log")

        conn = await asyncpg.connect(url)
        nc = await nats.connect(servers.nats.url)
        try:
            stream = f"{token.upper()}_D2D_EVENTS"

            async def relayed() -> bool:
                head = await conn.fetchval("SELECT count(*) FROM events")
                skipped = await conn.fetchval(SKIPPED_SQL)
                try:
                    on_stream = (await nc.jetstream().stream_info(stream)).state.messages
                except Exception:
                    return False
                return on_stream >= head - skipped

            await wait_until(relayed, timeout=SETTLE_TIMEOUT, interval=0.5, what="the stream holding the log")
            stored = {
                str(r[0]) for r in await conn.fetch("SELECT event_id FROM events WHERE type = 'payment.authorized'")
            }
            # The platform keeps appending (feedback's outcomes and alerts): count in one statement, and
            # the log after the stream, so every message counted is in the log counted.
            on_stream = (await nc.jetstream().stream_info(stream)).state.messages
            in_log, distinct = await conn.fetchrow("SELECT count(*), count(DISTINCT event_id) FROM events")
            skipped = await conn.fetchval(SKIPPED_SQL)
            decisions = await conn.fetchval("SELECT count(*) FROM events WHERE type = 'decision.made'")
            withdrawn = await conn.fetchval("SELECT count(*) FROM events WHERE type = 'decision.withdrawn'")
            dead_letters = await conn.fetchval("SELECT count(*) FROM dead_letters")
        finally:
            await conn.close()
            await nc.close()
        # After everything: the platform still decides (serving may have restarted moments ago, and the
        # channel may be backing off from its last refused connection: wait for it, within the timeout).
        await serving.stub.Predict(workload.requests[1], timeout=30, wait_for_ready=True)
    finally:
        load.stopping = True
        stop_supervising.set()
        await supervisor
        for client in (ingest, registry, serving):
            await client.channel.close()

    lost = len(load.acknowledged - stored)
    baseline_rate = load.appended_in_phase["baseline"] / phase_seconds
    fault_rate = load.appended_in_phase["faults"] / phase_seconds
    imprecise = {k: v for k, v in poisons.items() if v in ("UNKNOWN", "INTERNAL")}
    say(f"events acknowledged {len(load.acknowledged):,}, found {len(load.acknowledged & stored):,}, lost {lost};"
        f" log {in_log:,} rows ({in_log - distinct} duplicated), stream {on_stream:,} messages"
        f" ({on_stream - (in_log - skipped)} more than the log's publishable events)")  # fmt: skip
    held = fault_rate / baseline_rate if baseline_rate else 0.0
    say(f"appends/s: baseline {baseline_rate:,.0f}, under faults {fault_rate:,.0f} (held {held:.2f});"
        f" append errors retried: {dict(load.append_errors)}")  # fmt: skip
    say(f"predicts answered {load.predicts_answered:,} (baseline {load.predicts_in_phase['baseline']:,},"
        f" faults {load.predicts_in_phase['faults']:,}); errors retried: {dict(load.predict_errors)};"
        f" decisions logged {decisions:,}, withdrawn {withdrawn:,}")  # fmt: skip
    say(f"restarts: {dict(platform.restarts)}; dead letters: {dead_letters}")
    for name, answer in poisons.items():
        say(f"  poison {name}: {answer}")
    return {
        "bench": "faults", "quick": quick, "phase_seconds": phase_seconds,
        "baseline_appends_per_s": round(baseline_rate, 1), "fault_appends_per_s": round(fault_rate, 1),
        "load_held": round(held, 3),
        "baseline_predicts_per_s": round(load.predicts_in_phase["baseline"] / phase_seconds, 1),
        "fault_predicts_per_s": round(load.predicts_in_phase["faults"] / phase_seconds, 1),
        "faults_injected": sum(platform.restarts[n] > 0 for n in FAULTED),
        "restarts": dict(platform.restarts),
        "events_acknowledged": len(load.acknowledged), "events_found": len(load.acknowledged & stored),
        "events_lost": lost, "events_duplicated_in_log": in_log - distinct,
        "events_duplicated_on_stream": max(0, on_stream - (in_log - skipped)),
        "append_errors_retried": dict(load.append_errors),
        "predicts_answered": load.predicts_answered, "predict_errors_retried": dict(load.predict_errors),
        "decisions_logged": decisions, "decisions_withdrawn": withdrawn, "dead_letters": dead_letters,
        "poison_inputs": len(poisons), "poison_answers": poisons, "poison_answered_imprecisely": len(imprecise),
        "machine": machine(),
    }  # fmt: skip


def main() -> None:
    p = parser("faults", "Steady load while each process is killed in turn and poison inputs are sent.")
    p.add_argument("--tmp-dir", type=Path, help="where to put the servers' data (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data, traces) afterwards")
    args = p.parse_args()
    stop_on_sigterm()
    started = time.perf_counter()
    with bench_dir("faults", args.tmp_dir, args.keep) as tmp:
        with Servers(tmp, fsync=False) as servers, Services(tmp / "logs", restart_policy) as services:
            result = asyncio.run(run(args.quick, servers, services, tmp))
    say(f"done in {time.perf_counter() - started:.1f}s")
    emit(result)


if __name__ == "__main__":
    main()
