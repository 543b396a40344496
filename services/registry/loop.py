"""The registry's closed loop: a `retrain.requested` event becomes a candidate version that goes
through canary to production (or back out) without a person, every step an event in the log.

For each request, in log order (`RetrainLoop`):

1. train a candidate (`retrain_spec`): a model that has been deciding learns from its own decisions
   after the request, once enough of them are labelled; its lineage names the request
   (`retrain_request`);
2. move `canary` to it (`model.alias_set`, the reason naming the request) and give the canary the
   promotion policy's share of units (`model.policy_set`);
3. every few seconds ask a `CanaryJudge` for both arms' live metrics since the canary was set, and
   `judge` them against the model's promotion policy;
4. promote (`production` to the candidate, `canary` removed, share 0) or roll back (`canary`
   removed, share 0), the reason holding the numbers.

The loop's position (`log_positions`, `registry-retrain`) moves only once a request is fully
handled, so after a crash the request is handled again, and every step is idempotent: the
candidate is found by its lineage (not trained twice), the alias history says which steps were
taken (the canary is watched again, not retrained). A person who moves `production` or `canary`
meanwhile ends the watch: the loop appends nothing more for that request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import asyncpg

from d2d.errors import Refusal
from d2d.eventlog import StoredEvent
from d2d.training.decisions import decision_examples
from d2d.training.evaluation import weighted_metrics
from d2d.training.labels import DecisionLabel
from d2d.training.spec import SpecError, TrainingSpec
from services.registry.api import RegistryApi
from services.registry.store import AliasChange, ModelRecord, VersionRecord

log = logging.getLogger(__name__)

POSITION = "registry-retrain"
REQUEST_TYPE = "retrain.requested"
# Inverse-propensity weights are clipped here (a propensity below 1 % counts as 1 %).
MAX_WEIGHT = 100.0

Verdict = Literal["wait", "promote", "rollback"]


@dataclass(frozen=True)
class ArmMetrics:
    """One arm's live record since the canary was set: decisions made, decisions with a label, and
    the AUC over the labelled ones (None when they hold one class or none)."""

    decisions: int
    labelled: int
    auc: float | None


class CanaryJudge(Protocol):
    async def measure(self, model: str, versions: Mapping[str, int], since_seq: int) -> dict[str, ArmMetrics]:
        """Each arm's (`canary`, `production`) metrics over the decisions its version in `versions`
        made after log position `since_seq`."""
        ...


def _auc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def judge(policy: Mapping[str, Any], canary: ArmMetrics, production: ArmMetrics) -> tuple[Verdict, str]:
    """Promote, roll back or wait, with the reason and its numbers.

    A verdict needs `min_decisions` canary decisions and, on both arms, `min_labels` labelled
    decisions with an AUC; then the canary is promoted when its AUC is at least production's +
    `margin`, else rolled back. A canary that has made `max_decisions` decisions without that much
    evidence is rolled back: its labels are not coming."""
    counts = (
        f"canary {canary.decisions} decisions, {canary.labelled} labelled, AUC {_auc(canary.auc)};"
        f" production {production.decisions} decisions, {production.labelled} labelled, AUC {_auc(production.auc)}"
    )
    min_labels, margin = policy["min_labels"], policy["margin"]
    judgeable = (
        canary.auc is not None and production.auc is not None
        and canary.labelled >= min_labels and production.labelled >= min_labels
    )  # fmt: skip
    if judgeable and canary.decisions >= policy["min_decisions"]:
        assert canary.auc is not None and production.auc is not None
        if canary.auc >= production.auc + margin - 1e-12:  # a gain of exactly the margin passes
            return "promote", f"canary AUC {canary.auc:.4f} >= production {production.auc:.4f} {margin:+.4f}; {counts}"
        return "rollback", f"canary AUC {canary.auc:.4f} < production {production.auc:.4f} {margin:+.4f}; {counts}"
    if canary.decisions >= policy["max_decisions"]:
        return "rollback", (
            f"{canary.decisions} canary decisions reached max_decisions {policy['max_decisions']} without"
            f" {min_labels} labels of both classes on each arm; {counts}"
        )
    return "wait", f"waiting for {policy['min_decisions']} canary decisions and {min_labels} labels per arm; {counts}"


class DecisionOutcomesJudge:
    """Live metrics from the decision/outcome join (`decision_outcomes`, the feedback service's
    projection): decisions not withdrawn, AUC weighted by inverse propensity (clipped at
    `MAX_WEIGHT`) so labels seen only under some actions stand for all decisions.

    Stands in for the feedback service's `GetModelMetrics` until the registry can call it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def measure(self, model: str, versions: Mapping[str, int], since_seq: int) -> dict[str, ArmMetrics]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT arm, model_version, score, label, propensity FROM decision_outcomes"
                " WHERE model = $1 AND decision_seq > $2 AND NOT withdrawn",
                model, since_seq,
            )  # fmt: skip
        return {
            arm: arm_metrics([r for r in rows if r["arm"] == arm and r["model_version"] == version])
            for arm, version in versions.items()
        }


def arm_metrics(rows: Sequence[Mapping[str, Any]]) -> ArmMetrics:
    """Decisions, labelled decisions and their inverse-propensity-weighted AUC."""
    labelled = [r for r in rows if r["label"] is not None]
    auc = None
    if labelled:
        weights = [min(1.0 / r["propensity"], MAX_WEIGHT) for r in labelled]
        auc = weighted_metrics([r["label"] for r in labelled], [r["score"] for r in labelled], weights)["auc"]
    return ArmMetrics(len(rows), len(labelled), auc)


def retrain_spec(
    production: TrainingSpec,
    request: Mapping[str, Any],
    head: int,
    *,
    decisions_after: int | None = None,
    production_version: str = "",
) -> TrainingSpec:
    """What a candidate answering `request` (a retrain.requested payload) is trained on, over the log
    up to `head`: the one place that decides what a retrain learns from.

    A model that has been deciding (`decisions_after`: the request's log position) learns from its own
    decisions logged after the request, labelled by their outcomes and weighted by the inverse of
    their propensity (`DecisionLabel`, the label window that of the production spec's label, so
    decisions whose outcome could still come are left out). After the request, because the request
    says the world the older decisions describe has changed (drift, a drop in live AUC): a candidate
    that learnt from them would learn the old pattern again. Views, inputs, parameters and seed stay
    the production version's, so the candidate scores the inputs serving already logs. It boosts on
    from the production version's trees (`production_version`, as `init_model`): what did not change
    keeps what that version learnt from its (possibly fuller) labels, and the new trees, fitted to the
    decisions' outcomes and stopped early on their validation split, correct what did.

    A model with no decisions yet (`decisions_after` None) is retrained on the production spec
    itself (its label, e.g. outcome events) over the log up to `head`."""
    if decisions_after is None:
        return dataclasses.replace(production, to_seq=head)
    label = DecisionLabel(str(request["model"]), "inverse_propensity", window_seconds=production.label.window_seconds)
    return dataclasses.replace(
        production, label=label, after_seq=decisions_after, to_seq=head, init_model=production_version
    )


def _tag(request_id: str) -> str:
    """How the reason of every alias change the loop makes names the request it answers."""
    return f"retrain.requested {request_id}"


class RetrainLoop:
    """Handles `retrain.requested` events one at a time, in log order (see the module docstring)."""

    def __init__(
        self,
        api: RegistryApi,
        canary_judge: CanaryJudge,
        *,
        check_seconds: float = 5.0,
        poll_seconds: float = 1.0,
        min_training_labels: int = 1000,
    ) -> None:
        self.api = api
        self.store = api.store
        self.log = api.log
        self.canary_judge = canary_judge
        self.check_seconds = check_seconds
        self.poll_seconds = poll_seconds
        self.min_training_labels = min_training_labels

    async def run(self) -> None:
        """Forever (until cancelled): handle each new request, then record the position past it."""
        after = await self.log.position(POSITION)
        while True:
            requests = await self.log.read(after, 100, types=[REQUEST_TYPE])
            for request in requests:
                try:
                    await self.handle(request)
                except Exception:  # e.g. the database went away: the position stays, the request is retried
                    log.exception("retrain request %s: failed; handling it again shortly", request.event_id)
                    await asyncio.sleep(self.check_seconds)
                    break
                await self.log.set_position(POSITION, request.seq)
                after = request.seq
            else:
                if not requests:
                    await asyncio.sleep(self.poll_seconds)

    async def handle(self, request: StoredEvent) -> None:
        """Take the request through every step not taken yet (all of them, the first time)."""
        model, request_id = request.payload["model"], str(request.event_id)
        try:
            record = await self.store.get_model(model)
        except Refusal:
            log.warning("retrain request %s: model %s does not exist; nothing to do", request_id, model)
            return
        policy = self.store.promotion_policy(record)
        production = record.aliases.get("production")
        if policy is None or production is None:
            log.warning("retrain request %s: models/%s has no %s; nothing to do", request_id, model,
                        "promotion policy" if policy is None else "production version to retrain from")  # fmt: skip
            return
        candidate = await self._candidate(model, request, production)
        if candidate is None:
            return
        tag = _tag(request_id)
        steps = [c for c in await self.store.alias_history(model) if tag in c.reason]
        if any(c.alias == "production" or c.version is None for c in steps):  # decided: finish the clean-up
            await self._finish(model, candidate.version)
            return
        canary_set = next((c for c in reversed(steps) if c.alias == "canary"), None)
        if canary_set is None:
            canary_set = await self._start_canary(model, request, candidate, policy)
        else:
            await self._ensure_canary_share(await self.store.get_model(model), candidate.version)
        production_then = _alias_at(await self.store.alias_history(model), "production", canary_set.seq)
        if production_then is None:
            log.warning("retrain request %s: models/%s had no production version at the canary", request_id, model)
            return
        await self._watch(model, tag, candidate.version, production_then, canary_set.seq)

    async def _candidate(self, model: str, request: StoredEvent, production: int) -> VersionRecord | None:
        """The version answering the request: the one already trained for it, else a new one. A model
        that has been deciding learns from its decisions after the request (`retrain_spec`), so the
        training waits until `min_training_labels` of them are labelled past the label window (labels
        come in event time, days after the request)."""
        request_id = str(request.event_id)
        existing = await self.store.versions_with_lineage(model, "retrain_request", request_id)
        if existing:
            return existing[0]
        current = await self.store.get_version(model, str(production))
        production_spec = TrainingSpec.from_dict(current.spec)
        decisions_after = request.seq if await self._has_decided(model, request.seq) else None
        while True:
            spec = retrain_spec(
                production_spec,
                request.payload,
                await self.log.head(),
                decisions_after=decisions_after,
                production_version=f"models/{model}/versions/{production}",
            )
            if decisions_after is None:
                break
            labelled = await self._labelled(spec, current.feature_names)
            if labelled >= self.min_training_labels:
                break
            log.info("retrain request %s: models/%s has %d labelled decisions since the request; training at %d",
                     request_id, model, labelled, self.min_training_labels)  # fmt: skip
            await asyncio.sleep(self.check_seconds)
        lineage = {"retrain_request": request_id, "retrain_reason": request.payload.get("reason", "")}

        def progress(stage: str, message: str, fraction: float) -> None:
            log.info("retrain request %s: models/%s %s: %s", request_id, model, stage, message)

        try:
            return await self.api.train_version(model, spec, progress, lineage=lineage)
        except (SpecError, Refusal) as e:
            log.warning("retrain request %s: models/%s cannot be retrained: %s", request_id, model, e)
            return None

    async def _has_decided(self, model: str, seq: int) -> bool:
        """Whether `model` made decisions up to log position `seq` (the feedback service's join)."""
        async with self.log.pool.acquire() as conn:
            return bool(
                await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM decision_outcomes WHERE model = $1 AND decision_seq <= $2)",
                    model,
                    seq,
                )
            )

    async def _labelled(self, spec: TrainingSpec, names: Sequence[str]) -> int:
        """How many decisions `spec` would learn from now (0 while none is labelled)."""
        try:
            return (await decision_examples(self.log, spec, names)).counts["labelled"]
        except SpecError:
            return 0

    async def _start_canary(
        self, model: str, request: StoredEvent, candidate: VersionRecord, policy: Mapping[str, Any]
    ) -> AliasChange:
        reason = (
            f"{_tag(str(request.event_id))} ({request.payload.get('reason', '')}): canary version"
            f" {candidate.version}, trained on the log up to {candidate.spec.get('to_seq')}, held-out AUC"
            f" {_auc(candidate.evaluation.get('auc'))}; canary share {policy['canary_share']}"
        )
        change = await self.store.set_alias(model, "canary", candidate.version, reason)
        await self._ensure_canary_share(await self.store.get_model(model), candidate.version)
        log.info("models/%s: %s", model, reason)
        return change

    async def _ensure_canary_share(self, record: ModelRecord, version: int) -> None:
        """The canary at `version` gets the promotion policy's share of units (unless it has some)."""
        policy = self.store.promotion_policy(record)
        if policy and record.aliases.get("canary") == version and record.deployment_policy["canary_share"] == 0:
            await self.store.update_model(record.name, policy={"canary_share": policy["canary_share"]})

    async def _watch(self, model: str, tag: str, version: int, production: int, since_seq: int) -> None:
        while True:
            record = await self.store.get_model(model)
            if record.aliases.get("production") != production or record.aliases.get("canary") != version:
                log.info(
                    "%s: stopped watching models/%s canary %s: production is now %s, canary %s (moved by someone"
                    " else)", tag, model, version, record.aliases.get("production"), record.aliases.get("canary"),
                )  # fmt: skip
                return
            policy = self.store.promotion_policy(record)
            if policy is None:
                log.info("%s: stopped watching models/%s canary %s: the model has no promotion policy", tag, model,
                         version)  # fmt: skip
                return
            arms = await self.canary_judge.measure(model, {"canary": version, "production": production}, since_seq)
            verdict, reason = judge(policy, arms["canary"], arms["production"])
            if verdict == "wait":
                log.debug("%s: models/%s %s", tag, model, reason)
                await asyncio.sleep(self.check_seconds)
                continue
            if verdict == "promote":
                await self.store.set_alias(model, "production", version, f"{tag}: promoted canary: {reason}")
                await self.store.set_alias(model, "canary", None, f"{tag}: promoted to production: {reason}")
            else:
                await self.store.set_alias(model, "canary", None, f"{tag}: rolled back: {reason}")
            await self._finish(model, version)
            log.info("%s: models/%s version %s %s: %s", tag, model, version, verdict, reason)
            return

    async def _finish(self, model: str, version: int) -> None:
        """After a verdict: the candidate is no longer the canary and no units go to a canary."""
        record = await self.store.get_model(model)
        if record.aliases.get("canary") == version and record.aliases.get("production") == version:
            await self.store.set_alias(model, "canary", None, "the canary is production now")
            record = await self.store.get_model(model)
        if "canary" not in record.aliases and record.deployment_policy["canary_share"] != 0:
            await self.store.update_model(model, policy={"canary_share": 0.0})


def _alias_at(history: Sequence[AliasChange], alias: str, seq: int) -> int | None:
    """The version `alias` pointed at just after log position `seq`."""
    version = None
    for change in history:
        if change.seq > seq:
            break
        if change.alias == alias:
            version = change.version
    return version
