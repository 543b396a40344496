"""The README's client examples work against a real platform: examples/python/predict.py (the library
client) and examples/node/predict.js (grpc-js with the .proto files of protos/ loaded at run time)
each append a payment, get a decision on features that count it, and record its outcome, with the
API key in the `authorization` metadata. The services run in this process on the session's Postgres
and NATS, with one small model version registered and in production."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from d2d import eventlog
from d2d.client import IngestClient, RegistryClient
from d2d.config import Settings
from d2d.runtime.servers import EmbeddedPostgres, NatsServer, free_port
from d2d.sim.training import default_spec
from d2d.sim.views import VIEWS
from d2d.training.spec import input_names
from d2d.v1 import registry_pb2
from tests.conftest import ROOT, TEST_API_KEY, register_sim_contracts, seed_test_key, wait_healthy

MODEL = "fraud"
NODE_MODULES = ROOT / "examples" / "node" / "node_modules"


@dataclass
class Platform:
    addrs: dict[str, str]
    database_url: str


async def put_small_model_in_production(registry: RegistryClient) -> None:
    """A version of `fraud` on the simulator's served views and default inputs, from a few random rows
    (what it scores does not matter here, only that serving can decide with it)."""
    import numpy as np
    import xgboost as xgb

    spec = default_spec()
    names = input_names(spec, VIEWS)
    rng = np.random.default_rng(0)
    rows = xgb.DMatrix(rng.random((100, len(names))), label=rng.integers(0, 2, 100), feature_names=names)
    booster = xgb.train({"objective": "binary:logistic", "nthread": 1}, rows, 3)
    await registry.create_model(MODEL)
    await registry.stub.RegisterModelVersion(
        registry_pb2.RegisterModelVersionRequest(
            parent=f"models/{MODEL}",
            artifact=bytes(booster.save_raw(raw_format="ubj")),
            spec_json=json.dumps(spec.to_dict()),
            feature_names=names,
        )  # fmt: skip
    )
    await registry.set_alias(MODEL, "production", 1)


@pytest.fixture(scope="module")
async def platform(postgres: EmbeddedPostgres, nats_server: NatsServer) -> AsyncIterator[Platform]:
    from services.features.server import serve as serve_features
    from services.feedback.server import serve as serve_feedback
    from services.ingest.server import relay
    from services.ingest.server import serve as serve_ingest
    from services.registry.server import serve as serve_registry
    from services.serving.server import serve as serve_serving

    namespace = f"t{random.randrange(16**10):010x}"
    url = await asyncio.to_thread(postgres.create_database, f"examples_{namespace}")
    await eventlog.migrate(url)
    await seed_test_key(url)
    addrs = {name: f"127.0.0.1:{free_port()}" for name in ("ingest", "features", "registry", "serving", "feedback")}
    settings = Settings(
        database_url=url, nats_url=nats_server.url, nats_namespace=namespace, addrs=addrs,
        registry_retrain_loop=False,
    )  # fmt: skip
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(serve(settings, stop))
        for serve in (serve_ingest, relay, serve_features, serve_registry, serve_serving, serve_feedback)
    ]
    try:
        for addr in addrs.values():
            await wait_healthy(addr, tasks)
        async with IngestClient(addrs["ingest"], api_key=TEST_API_KEY) as ingest:
            await register_sim_contracts(ingest)
        async with RegistryClient(addrs["registry"], api_key=TEST_API_KEY) as registry:
            await put_small_model_in_production(registry)
        yield Platform(addrs, url)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)


async def run_example(platform: Platform, *command: str, customer: str) -> str:
    """Run an example as a user would (its own process; the key and addresses from the environment);
    its output, after asserting it succeeded."""
    env = {
        **os.environ, "D2D_API_KEY": TEST_API_KEY,
        "D2D_INGEST_ADDR": platform.addrs["ingest"], "D2D_SERVING_ADDR": platform.addrs["serving"],
        "D2D_FEEDBACK_ADDR": platform.addrs["feedback"],
    }  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, "--model", MODEL, "--customer", customer, "--label", "1",
        cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    text = output.decode()
    assert process.returncode == 0, text
    return text


async def assert_the_loop_is_in_the_log(platform: Platform, output: str, customer: str) -> None:
    """The example's payment, the decision it printed (on features counting that payment) and its
    outcome are all in the log."""
    decision_id = output.split("decision ", 1)[1].split(":", 1)[0]
    conn = await asyncpg.connect(platform.database_url)
    try:
        rows = await conn.fetch(
            "SELECT type, seq, payload FROM events WHERE (type = 'payment.authorized' AND payload->>'customer_id' = $1)"
            " OR entity_id = $2 OR (type = 'outcome.recorded' AND payload->>'decision_id' = $2) ORDER BY seq",
            customer, decision_id,
        )  # fmt: skip
    finally:
        await conn.close()
    by_type = {row["type"]: row for row in rows}
    assert set(by_type) == {"payment.authorized", "decision.made", "outcome.recorded"}, rows
    decision = json.loads(by_type["decision.made"]["payload"])
    assert (
        decision["entities"]["customer"] == customer
        and decision["feature_watermark"] >= by_type["payment.authorized"]["seq"]
    )
    assert decision["features"]["customer_payments.count_lifetime"] == 1  # the payment just appended
    assert json.loads(by_type["outcome.recorded"]["payload"])["label"] == 1
    assert f"at log seq {by_type['payment.authorized']['seq']}" in output


def new_customer() -> str:
    return f"cus_{random.randrange(10**9, 10**10)}"


async def test_the_python_example_appends_predicts_and_records_an_outcome(platform: Platform) -> None:
    customer = new_customer()
    output = await run_example(platform, sys.executable, "examples/python/predict.py", customer=customer)
    await assert_the_loop_is_in_the_log(platform, output, customer)


async def test_the_node_example_does_the_same_from_the_protos_alone(platform: Platform) -> None:
    node = shutil.which("node")
    assert node, "node is not installed: the Node example needs Node.js 18 or newer"
    assert NODE_MODULES.is_dir(), (
        f"{NODE_MODULES.relative_to(ROOT)} is missing: scripts/test.sh installs it (npm ci --prefix examples/node)"
    )
    customer = new_customer()
    output = await run_example(platform, node, "examples/node/predict.js", customer=customer)
    await assert_the_loop_is_in_the_log(platform, output, customer)
