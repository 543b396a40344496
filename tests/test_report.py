"""`d2d report`: one HTML page that opens with no network, every plot rendered by a real browser.

The log is written directly (a few simulated days of payments, two model versions with training
baselines, decisions by both with exploration, outcomes, the aliases moved by the registry); ingest,
registry, feedback and audit serve it in this process, the features service is away (its section
must still say something). The page is opened by Debian's headless chromium with every host name
unresolvable, and each plot container must hold a rendered plotly SVG.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest

from d2d.client import FeedbackClient, RegistryClient
from d2d.config import Settings
from d2d.eventlog import EventLog, NewEvent
from d2d.features.store import register_views
from d2d.report import figures, write_report
from d2d.report.gather import LoggedEvent, ReportData, chosen_decision
from d2d.runtime.servers import NatsServer, free_port
from d2d.runtime.services import service
from d2d.sim import PaymentsSimulator, SimConfig
from d2d.sim.views import CUSTOMER_PAYMENTS
from d2d.training.baseline import baseline, column_baseline
from d2d.training.pipeline import predict
from services.serving.decisions import choose
from tests.conftest import rule_outcome, run_cli, seed_test_key, service_url

MODEL = "fraud"
POLICY = {"threshold": 0.5, "epsilon": 0.2, "actions": ["approve", "decline"], "canary_share": 0.0}
REWARD = {"approve": {"0": 1.0, "1": -10.0}, "decline": 0.0}
DECIDED = datetime(2026, 1, 4, tzinfo=UTC)  # the day after the simulated payments
FEATURE = "customer_payments.count_lifetime"
PLOTS = ("events_per_type", "feature_freshness", "live_auc", "calibration", "drift_psi", "decisions_per_arm",
         "alias_history", "ope", "lineage")  # fmt: skip
BROWSER_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no host resolves: a page that needed the network would break
    "--virtual-time-budget=15000",
)  # fmt: skip


def artifact(seed: int, rounds: int, cut: float) -> bytes:
    """A model whose score rises with its one input (request.x) from about 0 to about 1 around `cut`."""
    import xgboost as xgb

    x = np.linspace(0, 1, 400).reshape(-1, 1)
    params = {"objective": "binary:logistic", "max_depth": 2, "eta": 0.5, "nthread": 1, "seed": seed}
    booster = xgb.train(params, xgb.DMatrix(x, label=(x[:, 0] > cut).astype(float)), rounds)
    return bytes(booster.save_raw(raw_format="ubj"))


async def register_version(log: EventLog, version: int, data: bytes) -> None:
    """A version as the registry records one: the artifact, then `model.registered` with the training
    baseline (inputs spread evenly over [0, 1]) and a held-out AUC."""
    sha = hashlib.sha256(data).hexdigest()
    trained_on = np.linspace(0, 1, 500)
    lineage = {
        "log_range": [0, 10], "baseline": {
            "inputs": baseline({"request.x": trained_on}),
            "score": column_baseline(predict(data, trained_on.reshape(-1, 1)).astype(np.float64)),
        },
    }  # fmt: skip
    payload = {"model": MODEL, "version": version, "sha256": sha, "spec": {}, "evaluation": {"auc": 0.9},
               "lineage": lineage, "feature_names": ["request.x"]}  # fmt: skip
    async with log.recording() as tx:  # the event and its projection (the registry's tables), as the registry does
        await tx.conn.execute("INSERT INTO artifacts (sha256, data, size_bytes) VALUES ($1, $2, $3)", sha, data,
                              len(data))  # fmt: skip
        await tx.append(NewEvent(uuid.uuid4(), "model.registered", 1, "model", MODEL, DECIDED, json.dumps(payload)))


async def decide(
    log: EventLog, version: int, arm: str, data: bytes, xs: np.ndarray, customers: list[str], seed: int
) -> None:
    """Decisions of `version` on inputs `xs` under the exploring policy, each for one of `customers`
    with a feature of theirs logged, and the outcomes of the approved ones (a declined payment shows
    nothing); labels drawn with probability x."""
    scores = predict(data, xs.reshape(-1, 1))
    rng = np.random.default_rng(seed)
    head = await log.head()
    decisions, outcomes = [], []
    for i, (x, score) in enumerate(zip(xs.tolist(), scores.tolist(), strict=True)):
        decision = uuid.uuid5(uuid.NAMESPACE_URL, f"report-test/{version}/{i}")
        choice = choose(score, POLICY, decision)
        payload = {
            "decision_id": str(decision), "model": MODEL, "model_version": f"models/{MODEL}/versions/{version}",
            "arm": arm, "score": score, "action": choice.action, "propensity": choice.propensity,
            "explored": choice.explored, "greedy_action": choice.greedy_action, "policy": POLICY,
            "features": {FEATURE: None}, "inputs": [x], "feature_watermark": max(head - i % 7, 0),
            "as_of": DECIDED.isoformat(), "entities": {"customer": customers[i % len(customers)]}, "context": {},
            "unit_id": customers[i % len(customers)], "request_id": f"req-{version}-{i}",
        }  # fmt: skip
        decisions.append(NewEvent(decision, "decision.made", 1, "decision", str(decision), DECIDED,
                                  json.dumps(payload)))  # fmt: skip
        if choice.action == "approve":
            outcomes.append(rule_outcome(str(decision), int(rng.random() < x), DECIDED + timedelta(days=30)))
    await log.append(decisions)
    await log.append(outcomes)


@contextlib.asynccontextmanager
async def serving(serve, settings: Settings, name: str) -> AsyncIterator[None]:  # noqa: ANN001
    """A service's `serve` in this event loop, listening, until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        async with grpc.aio.insecure_channel(settings.addr(name)) as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def platform(
    database_url: str, event_log: EventLog, nats_server: NatsServer, namespace: str
) -> AsyncIterator[dict[str, str]]:
    """Ingest, registry, feedback and audit in this process over a log of payments, two versions,
    their decisions and outcomes and the aliases moved; the services' addresses (features: nobody)."""
    from services.audit.server import serve as serve_audit
    from services.feedback.server import serve as serve_feedback
    from services.ingest.server import serve as serve_ingest
    from services.registry.server import serve as serve_registry

    await seed_test_key(database_url)
    addrs = {name: f"127.0.0.1:{free_port()}" for name in ("ingest", "registry", "feedback", "audit", "features")}
    sim = PaymentsSimulator(SimConfig(seed=5, days=3, payments_per_day=150, customers=60, merchants=8))
    simulated = list(sim.events())
    await event_log.append([e.as_new_event() for e in simulated])
    await register_views(event_log, [CUSTOMER_PAYMENTS])
    customers = sorted({e.payload["customer_id"] for e in simulated if e.type == "payment.authorized"})

    def settings(name: str) -> Settings:
        return Settings(database_url=service_url(database_url, name), nats_url=nats_server.url,
                        nats_namespace=namespace, addrs=addrs, registry_retrain_loop=False)  # fmt: skip

    async with contextlib.AsyncExitStack() as stack:
        for name, serve in (("ingest", serve_ingest), ("registry", serve_registry), ("feedback", serve_feedback),
                            ("audit", serve_audit)):  # fmt: skip
            await stack.enter_async_context(serving(serve, settings(name), name))
        async with RegistryClient(addrs["registry"]) as registry:
            await registry.wait_ready()
            await registry.create_model(MODEL, policy=POLICY)
            first, second = artifact(1, 20, 0.5), artifact(2, 8, 0.7)
            await register_version(event_log, 1, first)
            await register_version(event_log, 2, second)
            await registry.set_alias(MODEL, "production", 1)
            await decide(event_log, 1, "production", first, np.linspace(0, 1, 240), customers, seed=1)
            await registry.set_alias(MODEL, "canary", 2)
            await decide(
                event_log, 2, "canary", second, np.linspace(0.4, 1, 120), customers, seed=2
            )  # a shifted population
            await registry.set_alias(MODEL, "production", 2, reason="canary held")
        head = await event_log.head()
        async with FeedbackClient(addrs["feedback"]) as feedback:
            await feedback.wait_ready()
            while (await feedback.model_metrics(MODEL)).position < head:  # its join has read the whole log
                await asyncio.sleep(0.2)
        yield addrs


def cli_env(addrs: Mapping[str, str], database_url: str, nats_url: str) -> dict[str, str]:
    return {"D2D_DATABASE_URL": database_url, "D2D_NATS_URL": nats_url,
            **{service(name).addr_env: addr for name, addr in addrs.items()}}  # fmt: skip


def rendered_dom(page: Path, profile: Path) -> str:
    """The page's DOM after Debian's headless chromium has run its scripts."""
    browser = shutil.which("chromium")
    assert browser, "chromium is not installed: scripts/test.sh installs it (apt-get install chromium)"
    done = subprocess.run(
        [browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def plot_containers(dom: str) -> dict[str, str]:
    """`data-plot` name -> the container's markup up to the next section."""
    found = {}
    for match in re.finditer(r'<div data-plot="([a-z_]+)">', dom):
        rest = dom[match.end() :]
        found[match.group(1)] = rest[: rest.find("</section>")]
    return found


async def test_report_page_renders_every_plot_in_a_headless_browser_with_no_network(
    platform: dict[str, str], database_url: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    page = tmp_path / "report.html"
    code, out = await run_cli(cli_env(platform, database_url, nats_server.url), "report", "--out", str(page),
                              "--reward", json.dumps(REWARD))  # fmt: skip
    assert code == 0, out
    assert "wrote" in out
    source = page.read_text()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=[\"']?(https?:)?//", source), "the page fetches something"
    dom = await asyncio.to_thread(rendered_dom, page, tmp_path / "chromium")
    containers = plot_containers(dom)
    assert sorted(containers) == sorted(PLOTS), f"sections with no plot: {set(PLOTS) - set(containers)}\n{out}"
    for name, markup in containers.items():
        assert 'class="main-svg"' in markup, f"{name} did not render"
    assert "plot-container" in containers["lineage"] and "sankey" in containers["lineage"]
    assert "the features service is not reachable" not in out  # freshness comes from the decisions' watermarks


async def test_report_traces_the_decision_asked_for_by_its_request_id(platform: dict[str, str], tmp_path: Path) -> None:
    _, data, sections = await write_report(tmp_path / "r.html", platform, decision="req-2-5")
    assert data.explanation is not None
    assert data.explanation["decision"]["request_id"] == "req-2-5"
    lineage = next(s for s in sections if s.key == "lineage")
    labels = lineage.figure.data[0].node.label
    assert any(label.startswith("fraud v2") for label in labels)
    assert f"feature {FEATURE}" in labels
    fed = [label for label in labels if "events of customer<br>" in label]  # the customer's payments behind it
    assert len(fed) == 1 and not fed[0].startswith("0 events"), labels


async def test_report_with_no_model_yet_says_why_each_section_has_no_plot(
    database_url: str, nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    from services.ingest.server import serve as serve_ingest

    await seed_test_key(database_url)
    addrs = {name: f"127.0.0.1:{free_port()}" for name in ("ingest", "registry", "feedback", "audit", "features")}
    settings = Settings(database_url=service_url(database_url, "ingest"), nats_url=nats_server.url,
                        nats_namespace=namespace, addrs=addrs)  # fmt: skip
    async with serving(serve_ingest, settings, "ingest"):
        path, data, sections = await write_report(tmp_path / "empty.html", addrs)
    assert [s.key for s in sections if s.figure is not None] == ["events_per_type"]  # the key seeded is an event
    reasons = {s.key: s.missing for s in sections}
    assert reasons["live_auc"] == reasons["drift_psi"] == reasons["ope"] == "the registry service is not reachable"
    assert reasons["lineage"] == "no decision in the log yet"
    source = path.read_text()
    assert all(f'data-missing="{key}"' in source for key in PLOTS if key != "events_per_type")


def test_ope_error_bars_reach_exactly_the_interval_bounds() -> None:
    data = ReportData(generated_at=DECIDED)
    data.ope[MODEL] = [{
        "model_version": "models/fraud/versions/2",
        "estimates": {"ips": {"value": 0.4, "ci_low": 0.1, "ci_high": 0.9},
                      "snips": {"value": 0.5, "ci_low": 0.45, "ci_high": 0.52},
                      "dr": {"value": 0.3, "ci_low": None, "ci_high": None}},
        "logging": {"value": 0.2, "ci_low": 0.15, "ci_high": 0.3},
    }]  # fmt: skip
    section = figures.ope(data)
    bars = section.figure.data[0]
    lows = [v - d if d is not None else None for v, d in zip(bars.y, bars.error_y.arrayminus, strict=True)]
    highs = [v + u if u is not None else None for v, u in zip(bars.y, bars.error_y.array, strict=True)]
    assert list(bars.x) == ["ips", "snips", "dr"]
    assert lows[:2] == pytest.approx([0.1, 0.45]) and highs[:2] == pytest.approx([0.9, 0.52])
    assert lows[2] is None and highs[2] is None  # no interval: no error bar, not a zero-width one
    logging = section.figure.data[1]
    assert logging.name == "logging policy" and logging.y[0] + logging.error_y.array[0] == pytest.approx(0.3)


def test_the_lineage_drawn_by_default_is_the_newest_decision_with_an_outcome() -> None:
    def event(seq: int, kind: str, payload: dict) -> LoggedEvent:
        return LoggedEvent(seq, kind, DECIDED, DECIDED, payload)

    events = [
        event(1, "decision.made", {"decision_id": "a", "request_id": "ra"}),
        event(2, "decision.made", {"decision_id": "b", "request_id": "rb"}),
        event(3, "outcome.recorded", {"decision_id": "a", "label": 0}),
        event(4, "decision.made", {"decision_id": "c", "request_id": "rc"}),
        event(5, "outcome.recorded", {"decision_id": "c", "label": 1}),
        event(6, "decision.withdrawn", {"decision_id": "c"}),
        event(7, "decision.made", {"decision_id": "d", "request_id": "rd"}),
    ]
    assert chosen_decision(events, None) == "a"  # c has an outcome but was withdrawn; d has none yet
    assert chosen_decision(events, "rb") == "b"
    assert chosen_decision(events[-1:], None) == "d"
    assert chosen_decision([], None) is None


def test_freshness_before_any_decision_is_how_far_the_features_service_trails_the_log() -> None:
    data = ReportData(generated_at=DECIDED, head_seq=1_200, features_watermark=1_150)
    section = figures.feature_freshness(data)
    assert section.figure.data[0].value == 50
    data.features_watermark = None
    data.missing["features"] = "the features service is not reachable"
    assert "the features service is not reachable" in figures.feature_freshness(data).missing


def test_events_per_type_are_counted_in_equal_spans_of_time() -> None:
    at = [DECIDED + timedelta(minutes=m) for m in (0, 1, 2, 59, 60)]
    events = [LoggedEvent(i, "a" if i < 3 else "b", t, t) for i, t in enumerate(at)]
    counted = figures.binned(events, ["a", "b"], "occurred_at", bins=2)
    starts, a, width = counted["a"]
    assert starts == [DECIDED, DECIDED + timedelta(minutes=30)] and width == 30 * 60 * 1000
    assert a == [3, 0] and counted["b"][1] == [0, 2]  # the last instant is in the last span
