"""Loaded model versions, micro-batched scoring, and a model's deployment (which versions act)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from d2d.batching import Batcher
from d2d.client import RegistryClient
from d2d.features.definitions import NUMBER, TEXT, TRANSFORM_INPUT_KIND, FeatureView
from d2d.policies import Policy, policy_from_proto
from d2d.training.spec import TrainingSpec, model_inputs


class MicroBatcher:
    """Scores rows of model inputs; concurrent requests are folded into one predict call.

    While a predict call runs, new rows queue; the next call takes all of them (up to `max_batch`):
    a `d2d.batching.Batcher` whose call is one `inplace_predict`. With `enabled=False` every row is
    its own call (the baseline the benchmark compares with).
    """

    def __init__(self, booster: Any, *, max_batch: int = 512, enabled: bool = True) -> None:
        booster.set_param({"nthread": 1})  # OpenMP threads spin on a busy 2-core machine: 10x the CPU
        self.booster = booster
        best = int(booster.attr("best_iteration") or -1)
        self.iteration_range = (0, best + 1) if best >= 0 else (0, 0)
        self.enabled = enabled
        self.calls = 0
        self.rows = 0
        self._batcher: Batcher[list[float], float] = Batcher(
            self._predict_rows, name="the scorer", max_weight=max_batch, span="serving.score_batch"
        )

    def _predict(self, rows: list[list[float]]) -> list[float]:
        self.calls += 1
        self.rows += len(rows)
        scores = self.booster.inplace_predict(
            np.asarray(rows, dtype=np.float64), iteration_range=self.iteration_range, missing=np.nan,
            validate_features=False,
        )  # fmt: skip
        return [float(s) for s in scores]

    async def _predict_rows(self, rows: list[list[float]]) -> list[float]:
        return self._predict(rows)

    async def score(self, row: list[float]) -> float:
        if not self.enabled:
            return self._predict([row])[0]
        return await self._batcher.submit(row)

    def close(self) -> None:
        self._batcher.close()


@dataclass
class LoadedVersion:
    model: str
    version: int
    sha256: str
    spec: TrainingSpec
    views: list[FeatureView]
    batcher: MicroBatcher

    @property
    def name(self) -> str:
        return f"models/{self.model}/versions/{self.version}"

    def inputs(self, features: dict[str, Any], request: dict[str, Any]) -> list[float]:
        return model_inputs(self.spec, self.views, features, request)


@dataclass
class Deployment:
    model: str
    policy: Policy  # how an action is chosen from the acting version's score
    canary_share: float  # share of units routed to the canary (by a hash of the unit id)
    production: LoadedVersion
    canary: LoadedVersion | None = None
    shadows: list[LoadedVersion] = field(default_factory=list)

    def versions(self) -> list[LoadedVersion]:
        return [v for v in (self.production, self.canary, *self.shadows) if v is not None]

    @cached_property
    def logged_policy(self) -> dict[str, Any]:
        """The deployment policy as each decision.made carries it: the policy's dict and the share."""
        return {**self.policy.to_dict(), "canary_share": self.canary_share}

    @cached_property
    def request_inputs(self) -> dict[tuple[str, ...], set[str]]:
        """The request context fields its versions read (a path of keys) and what each value must be
        (NUMBER, TIME, TEXT, SCALAR): what Predict checks a context against before deciding."""
        kinds: dict[tuple[str, ...], set[str]] = {}
        for version in self.versions():
            spec = version.spec
            for name in spec.request_numbers:
                kinds.setdefault((name,), set()).add(NUMBER)
            for name, _ in spec.request_flags:
                kinds.setdefault((name,), set()).add(TEXT)
            for transform in spec.transforms:
                for ref in transform.inputs:
                    head, _, rest = ref.partition(".")
                    if head == "request":
                        kinds.setdefault(tuple(rest.split(".")), set()).add(TRANSFORM_INPUT_KIND[transform.op])
        return kinds

    def views(self) -> list[FeatureView]:
        """Every view any of its versions reads (what serving must hold before switching to it)."""
        return list({(view.name, view.version): view for v in self.versions() for view in v.views}.values())

    def feature_refs(self) -> list[str]:
        """Every `{view}.*` any of its versions needs: one FeatureService call covers all."""
        return list(dict.fromkeys(f"{view.name}.*" for v in self.versions() for view in v.views))

    def close(self) -> None:
        for v in self.versions():
            v.batcher.close()


class NoProductionVersion(Exception):
    pass


async def load_deployment(
    registry: RegistryClient,
    model: str,
    views: dict[tuple[str, str], FeatureView],
    cache: dict[str, LoadedVersion],
    *,
    micro_batching: bool = True,
) -> Deployment:
    """Read the model's aliases and policy from the registry and load the versions they name.

    `cache` (by sha256) keeps versions already loaded, so a hot swap loads only what is new."""
    import xgboost as xgb

    record = await registry.get_model(model)
    aliases = dict(record.aliases)
    if "production" not in aliases:
        raise NoProductionVersion(f"models/{model} has no production version")
    policy = policy_from_proto(record.deployment_policy)
    canary_share = record.deployment_policy.canary_share

    async def load(number: str) -> LoadedVersion:
        meta = await registry.get_version(model, number)
        cached = cache.get(meta.sha256)
        if cached is not None and cached.model == model and str(cached.version) == number:
            return cached
        data, _ = await registry.artifact(model, number)
        booster = xgb.Booster(params={"nthread": 1})
        booster.load_model(bytearray(data))
        spec = TrainingSpec.from_json(meta.spec_json)
        loaded = LoadedVersion(
            model, int(number), meta.sha256, spec, [views[v] for v in spec.views],
            MicroBatcher(booster, enabled=micro_batching),
        )  # fmt: skip
        cache[meta.sha256] = loaded
        return loaded

    production = await load(aliases["production"])
    canary = await load(aliases["canary"]) if "canary" in aliases and canary_share > 0 else None
    shadows = [await load(aliases["shadow"])] if "shadow" in aliases else []
    return Deployment(model, policy, canary_share, production, canary, shadows)


def plain(value: float) -> float | None:
    return None if math.isnan(value) else value
