"""Decision policies (d2d.policies) of both kinds with both explorations: serving's draw takes each
action as often as the logged propensity says, old logged policies still read, and the registry
refuses a bad policy naming its field and keeps a good one with its kind."""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2

from d2d.client import RegistryClient, error_details
from d2d.config import Settings
from d2d.errors import Refusal
from d2d.eventlog import EventLog
from d2d.policies import (
    EpsilonGreedy,
    Policy,
    ThresholdPolicy,
    best_action_policy,
    deployment_policy_proto,
    policy_from_dict,
    policy_from_proto,
    threshold_policy,
)
from d2d.runtime.servers import free_port
from d2d.v1 import registry_pb2
from services.registry.server import serve
from services.serving.decisions import choose, decision_id, unit_interval
from tests.conftest import run_cli, seed_test_key

DECISIONS = 20_000
# The 0.999 quantile of the chi-square distribution by degrees of freedom (K actions: K - 1).
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266}

THREE = {"approve": (-1.0, 0.6), "review": (0.0, 0.15), "decline": (1.0, -0.3)}
POLICIES = {
    "threshold/epsilon_greedy": threshold_policy(["approve", "decline"], 0.5, epsilon=0.3),
    "threshold/softmax": threshold_policy(["approve", "decline"], 0.5, temperature=0.2),
    "best_action/epsilon_greedy": best_action_policy(THREE, epsilon=0.3),
    "best_action/softmax": best_action_policy(THREE, temperature=0.25),
}


@pytest.mark.parametrize("score", [0.1, 0.45, 0.8])
@pytest.mark.parametrize("name", list(POLICIES))
def test_drawn_actions_follow_the_probabilities_logged_as_propensities(name: str, score: float) -> None:
    """Over 20,000 decision ids at one score, serving's `choose` takes each action as often as the
    policy's probabilities say (chi-square, p > 0.001), and logs exactly that probability."""
    policy = POLICIES[name]
    probabilities = policy.probabilities(score)
    assert math.isclose(math.fsum(probabilities.values()), 1.0, abs_tol=1e-12)
    counts: Counter[str] = Counter()
    for i in range(DECISIONS):
        decision = decision_id("policy-test", f"{name}/{score}/{i}")
        choice = choose(score, policy, decision)
        u, v = unit_interval("explore", str(decision)), unit_interval("pick", str(decision))
        assert choice.action == policy.draw(score, u, v)
        assert choice.propensity == probabilities[choice.action]
        assert choice.greedy_action == policy.greedy(score)
        assert choice.explored == (choice.action != choice.greedy_action)
        counts[choice.action] += 1
    chi2 = sum((counts[a] - DECISIONS * p) ** 2 / (DECISIONS * p) for a, p in probabilities.items())
    assert chi2 < CHI2_999[len(probabilities) - 1], (name, score, dict(counts), probabilities)


def test_a_decision_id_draws_the_same_action_every_time() -> None:
    decision = decision_id("policy-test", "request-7")
    for policy in POLICIES.values():
        assert len({choose(0.45, policy, decision).action for _ in range(5)}) == 1


def test_best_action_takes_the_highest_utility_and_breaks_ties_by_action_order() -> None:
    policy = best_action_policy(THREE)  # approve 0.6 - s, review 0.15, decline s - 0.3
    assert [policy.greedy(s) for s in (0.1, 0.3, 0.6, 0.9)] == ["approve", "approve", "decline", "decline"]
    assert best_action_policy({"a": (0.0, 1.0), "b": (0.0, 1.0), "c": (0.0, 0.0)}).greedy(0.5) == "a"
    middle = best_action_policy({"low": (-2.0, 1.0), "mid": (0.0, 0.2), "high": (2.0, -1.0)})
    assert [middle.greedy(s) for s in (0.1, 0.5, 0.9)] == ["low", "mid", "high"]
    # Without exploration the greedy action is certain.
    assert middle.probabilities(0.5) == {"low": 0.0, "mid": 1.0, "high": 0.0}


def test_softmax_probabilities_are_proportional_to_exp_utility_over_temperature() -> None:
    # utilities at score 0.5: a = 0, b = ln 2, c = ln 4; temperature 1: weights 1, 2, 4
    policy = best_action_policy({"a": (0.0, 0.0), "b": (2 * math.log(2), 0.0), "c": (0.0, math.log(4))}, temperature=1)
    assert policy.probabilities(0.5) == pytest.approx({"a": 1 / 7, "b": 2 / 7, "c": 4 / 7}, abs=1e-15)
    # threshold: utilities 0 and score - threshold; at temperature 0.1 and score 0.6, exp(1) : 1
    threshold = threshold_policy(["approve", "decline"], 0.5, temperature=0.1)
    expected = math.e / (1 + math.e)
    assert threshold.probabilities(0.6) == pytest.approx({"approve": 1 - expected, "decline": expected}, abs=1e-15)
    assert threshold.greedy(0.5) == "decline" and threshold.greedy(0.49) == "approve"


def test_epsilon_greedy_spreads_epsilon_over_every_action() -> None:
    policy = best_action_policy(THREE, epsilon=0.3)
    assert policy.probabilities(0.9) == pytest.approx({"approve": 0.1, "review": 0.1, "decline": 0.8})


def test_a_policy_logged_before_kinds_reads_as_threshold_with_epsilon_greedy() -> None:
    old = {"canary_share": 0.2, "epsilon": 0.1, "threshold": 0.4, "actions": ["approve", "decline"]}
    policy = policy_from_dict(old)
    assert policy == ThresholdPolicy(("approve", "decline"), EpsilonGreedy(0.1), 0.4)
    assert policy.to_dict() == {"kind": "threshold", "actions": ["approve", "decline"], "threshold": 0.4,
                                "exploration": "epsilon_greedy", "epsilon": 0.1}  # fmt: skip
    # the scores logged for each action, as before kinds existed
    assert policy.action_scores(0.7) == pytest.approx({"decline": 0.7, "approve": 0.3})


@pytest.mark.parametrize("policy", list(POLICIES.values()), ids=list(POLICIES))
def test_a_policy_reads_back_equal_from_its_dict_and_its_message(policy: Policy) -> None:
    assert policy_from_dict(policy.to_dict()) == policy
    message = deployment_policy_proto(policy, canary_share=0.25)
    assert policy_from_proto(message) == policy and message.canary_share == 0.25


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"kind": "threshold", "threshold": 0.5, "actions": ["a", "b", "c"]}, "policy.actions"),
        ({"kind": "threshold", "threshold": 0.5, "actions": ["a", "a"]}, "policy.actions[1]"),
        ({"kind": "threshold", "threshold": math.nan, "actions": ["a", "b"]}, "policy.threshold"),
        ({"kind": "threshold", "threshold": 0.5, "actions": ["a", "b"], "epsilon": 1.5}, "policy.epsilon"),
        (
            {
                "kind": "threshold",
                "threshold": 0.5,
                "actions": ["a", "b"],
                "exploration": "softmax",
                "temperature": 0.0,
            },
            "policy.temperature",
        ),  # fmt: skip
        ({"kind": "best_action", "utilities": [{"action": "a", "weight": 1}]}, "policy.utilities"),
        (
            {
                "kind": "best_action",
                "utilities": [
                    {"action": "a", "weight": 1},
                    {"action": "b", "weight": 1},
                    {"action": "c", "weight": math.inf},
                ],
            },
            "policy.utilities[2].weight",
        ),  # fmt: skip
        (
            {"kind": "best_action", "utilities": [{"action": "a", "weight": 1}, {"action": "a", "weight": 2}]},
            "policy.utilities[1].action",
        ),  # fmt: skip
        (
            {"kind": "best_action", "utilities": [{"action": "a", "weight": 1}, {"action": "", "weight": 2}]},
            "policy.utilities[1].action",
        ),  # fmt: skip
        (
            {
                "kind": "best_action",
                "utilities": [{"action": "a", "weight": 1}, {"action": "b", "weight": 2}],
                "actions": ["b", "a"],
            },
            "policy.actions",
        ),  # fmt: skip
        ({"kind": "bandit", "actions": ["a", "b"]}, "policy.kind"),
        ({"kind": "threshold", "threshold": 0.5, "actions": ["a", "b"], "exploration": "ucb"}, "policy.exploration"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_field(policy: dict, field: str) -> None:
    with pytest.raises(Refusal) as refused:
        policy_from_dict(policy)
    assert refused.value.code == "INVALID_ARGUMENT" and refused.value.field == field, refused.value.message


# -- through the registry -------------------------------------------------------------------------


@pytest.fixture
async def registry(database_url: str) -> AsyncIterator[tuple[RegistryClient, EventLog]]:
    from d2d import eventlog

    settings = Settings(database_url=database_url, addrs={"registry": f"127.0.0.1:{free_port()}"})
    await seed_test_key(database_url)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    client = RegistryClient(settings.addr("registry"))
    await client.wait_ready()
    pool = await eventlog.create_pool(database_url, max_size=2)
    yield client, EventLog(pool)
    await pool.close()
    stop.set()
    await task
    await client.channel.close()


async def update(client: RegistryClient, model: str, policy: registry_pb2.DeploymentPolicy) -> registry_pb2.Model:
    request = registry_pb2.UpdateModelRequest(
        model=registry_pb2.Model(name=f"models/{model}", deployment_policy=policy),
        update_mask=field_mask_pb2.FieldMask(paths=["deployment_policy"]),
    )
    return await client.stub.UpdateModel(request, timeout=30)


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    return [
        v.field for d in error_details(error) if isinstance(d, error_details_pb2.BadRequest) for v in d.field_violations
    ]


Message = registry_pb2.DeploymentPolicy


def utilities(*entries: tuple[str, float, float]) -> list[registry_pb2.ActionUtility]:
    return [registry_pb2.ActionUtility(action=a, weight=w, bias=b) for a, w, b in entries]


BAD_POLICIES = [
    (Message(kind=Message.BEST_ACTION, utilities=utilities(("a", 1, 0), ("b", 1, 0), ("c", math.nan, 0))),
     "model.deployment_policy.utilities[2].weight"),
    (Message(kind=Message.BEST_ACTION, utilities=utilities(("a", 1, 0), ("b", 1, 0), ("c", 1, math.inf))),
     "model.deployment_policy.utilities[2].bias"),
    (Message(kind=Message.BEST_ACTION, utilities=utilities(("a", 1, 0), ("", 1, 0))),
     "model.deployment_policy.utilities[1].action"),
    (Message(kind=Message.BEST_ACTION, utilities=utilities(("a", 1, 0), ("b", 1, 0), ("a", 0, 0))),
     "model.deployment_policy.utilities[2].action"),
    (Message(kind=Message.THRESHOLD, threshold=0.5, actions=["a", "b", "c"]), "model.deployment_policy.actions"),
    (Message(kind=Message.THRESHOLD, threshold=0.5, exploration=Message.SOFTMAX, temperature=0.0),
     "model.deployment_policy.temperature"),
    (Message(kind=Message.THRESHOLD, threshold=0.5, exploration=Message.SOFTMAX, temperature=-1.0),
     "model.deployment_policy.temperature"),
    (Message(kind=Message.THRESHOLD, threshold=0.5, epsilon=1.01), "model.deployment_policy.epsilon"),
    (Message(kind=Message.THRESHOLD, threshold=0.5, epsilon=-0.1), "model.deployment_policy.epsilon"),
    (Message(kind=Message.THRESHOLD, threshold=0.5, canary_share=2.0), "model.deployment_policy.canary_share"),
]  # fmt: skip


async def test_the_registry_refuses_a_bad_policy_naming_the_field_and_records_nothing(registry) -> None:  # noqa: ANN001
    client, log = registry
    await client.create_model("refused", policy={"epsilon": 0.0, "threshold": 0.5, "actions": ["approve", "decline"]})
    head = await log.head()
    for message, field in BAD_POLICIES:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await update(client, "refused", message)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert violations(refused.value) == [field], refused.value.details()
    assert await log.head() == head  # no model.policy_set
    # A new model with a bad policy is refused the same way.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        model = registry_pb2.Model(deployment_policy=BAD_POLICIES[0][0])
        await client.stub.CreateModel(registry_pb2.CreateModelRequest(model_id="refused-too", model=model), timeout=30)
    assert violations(refused.value) == ["model.deployment_policy.utilities[2].weight"]


async def test_a_best_action_policy_is_recorded_with_its_kind_and_read_back(registry) -> None:  # noqa: ANN001
    client, log = registry
    await client.create_model("kinds", policy={"epsilon": 0.1, "threshold": 0.5, "actions": ["approve", "decline"]})
    policy = best_action_policy(THREE, temperature=0.25)
    updated = await client.set_policy("kinds", policy, canary_share=0.1)
    assert policy_from_proto(updated.deployment_policy) == policy and updated.deployment_policy.canary_share == 0.1
    read = (await client.get_model("kinds")).deployment_policy
    assert read.kind == Message.BEST_ACTION and read.exploration == Message.SOFTMAX and read.temperature == 0.25
    assert list(read.actions) == ["approve", "review", "decline"]
    assert [(u.action, u.weight, u.bias) for u in read.utilities] == [(a, w, b) for a, (w, b) in THREE.items()]
    [event] = await log.newest(below=None, limit=1, event_type="model.policy_set", entity_id="kinds")
    assert event.schema_version == 2
    assert event.payload["policy"] == {"canary_share": 0.1, **policy.to_dict()}
    assert event.payload["policy"]["kind"] == "best_action"

    # Moving the canary share alone (as the registry's promotion loop does) keeps the policy.
    from services.registry.store import ModelStore

    record = await ModelStore(log).update_model("kinds", policy={"canary_share": 0.0})
    assert policy_from_dict(record.deployment_policy) == policy and record.deployment_policy["canary_share"] == 0.0

    # Back to a threshold policy over two actions.
    back = threshold_policy(["approve", "decline"], 0.4, epsilon=0.05)
    assert policy_from_proto((await client.set_policy("kinds", back)).deployment_policy) == back


async def test_a_policy_recorded_before_kinds_reads_as_threshold_with_epsilon_greedy(registry) -> None:  # noqa: ANN001
    """A model.policy_set written by an older registry (version 1 of its contract, no kind) is read
    by GetModel as what it meant: a threshold policy with epsilon-greedy exploration."""
    import uuid
    from datetime import UTC, datetime

    import orjson

    from d2d.eventlog import NewEvent

    client, log = registry
    await client.create_model("old-policy", policy={"epsilon": 0.0, "threshold": 0.5, "actions": ["ok", "no"]})
    old = {"canary_share": 0.3, "epsilon": 0.2, "threshold": 0.7, "actions": ["ok", "no"]}
    payload = orjson.dumps({"model": "old-policy", "policy": old}).decode()
    async with log.recording() as tx:
        await tx.append(
            NewEvent(uuid.uuid4(), "model.policy_set", 1, "model", "old-policy", datetime.now(UTC), payload)
        )
    read = (await client.get_model("old-policy")).deployment_policy
    assert policy_from_proto(read) == ThresholdPolicy(("ok", "no"), EpsilonGreedy(0.2), 0.7)
    assert read.kind == Message.THRESHOLD and read.exploration == Message.EPSILON_GREEDY and read.canary_share == 0.3


async def test_d2d_models_policy_sets_a_best_action_policy_and_refuses_a_bad_one_naming_the_field(
    registry,  # noqa: ANN001
    database_url: str,
) -> None:
    client, _ = registry
    await client.create_model("cli-policy", policy=threshold_policy(["approve", "decline"], 0.5))
    env = {"D2D_DATABASE_URL": database_url, "D2D_NATS_URL": "nats://unused", "D2D_REGISTRY_ADDR": client.target}
    policy = best_action_policy(THREE, epsilon=0.1)
    code, out = await run_cli(env, "models", "policy", "cli-policy", "--set", json.dumps(policy.to_dict()),
                              "--canary-share", "0.2")  # fmt: skip
    assert code == 0, out
    assert "best_action of approve -1*score+0.6, review 0*score+0.15, decline 1*score-0.3, epsilon 0.1" in out, out
    read = (await client.get_model("cli-policy")).deployment_policy
    assert policy_from_proto(read) == policy and read.canary_share == 0.2
    bad = {**policy.to_dict(), "exploration": "softmax", "temperature": -1}
    code, out = await run_cli(env, "models", "policy", "cli-policy", "--set", json.dumps(bad))
    assert code != 0 and "--set.temperature must be above 0" in out, out
    assert policy_from_proto((await client.get_model("cli-policy")).deployment_policy) == policy
