"""`d2d models list|show|train|promote|rollback|reproduce|policy`: the model registry, through RegistryService.

`reproduce` asks the registry to retrain a version from its stored spec (`ReproduceModelVersion`,
which registers nothing) and exits 1 when the bytes differ from the stored artifact's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.table import Table

from d2d.cli.common import console, run_rpc
from d2d.cli.common import endpoints as resolve_endpoints
from d2d.cli.common import settings as cli_settings
from d2d.config import Settings


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="the model registry")
    msub = models.add_subparsers(dest="action", required=True)
    msub.add_parser("list")
    mshow = msub.add_parser("show", help="versions, aliases and their history; with VERSION its evaluation")
    mshow.add_argument("model")
    mshow.add_argument("version", nargs="?")
    mtrain = msub.add_parser("train", help="train a new version from the log (creates the model if needed)")
    mtrain.add_argument("model")
    mtrain.add_argument("--spec", help="training spec JSON file (default: D2D_TRAINING_DEFAULTS's default_spec())")
    mtrain.add_argument("--rounds", type=int, help="boosting rounds for the default spec")
    mtrain.add_argument("--description", default="")
    mtrain.add_argument("--truth", help="CSV of true probabilities (the simulator's), to evaluate against")
    mpromote = msub.add_parser("promote", help="point an alias at a version (production: gated by default)")
    mpromote.add_argument("model")
    mpromote.add_argument("version")
    mpromote.add_argument("--alias", default="production", choices=["production", "canary", "shadow"])
    mpromote.add_argument("--margin", type=float, default=0.0, help="AUC the candidate must gain over the target")
    mpromote.add_argument("--no-gate", action="store_true")
    mpromote.add_argument("--reason", default="")
    mroll = msub.add_parser("rollback", help="point an alias back at the version it had before")
    mroll.add_argument("model")
    mroll.add_argument("--alias", default="production")
    mrepro = msub.add_parser("reproduce", help="retrain a version from its stored spec and compare sha256")
    mrepro.add_argument("model")
    mrepro.add_argument("version")
    mpolicy = msub.add_parser("policy", help="show or set the model's deployment policy (threshold or best_action)")
    mpolicy.add_argument("model")
    mpolicy.add_argument(
        "--set", metavar="JSON", dest="policy_json",
        help='the decision policy, e.g. {"kind": "best_action", "utilities": [{"action": "approve", "weight": -1, '
        '"bias": 0.6}, {"action": "review", "weight": 0, "bias": 0.1}, {"action": "decline", "weight": 1, "bias": 0}],'
        ' "exploration": "softmax", "temperature": 0.05}, or {"kind": "threshold", "threshold": 0.5, "epsilon": 0.1,'
        ' "actions": ["approve", "decline"]}',
    )  # fmt: skip
    mpolicy.add_argument("--canary-share", type=float, help="share of units for the canary (default: the current)")
    models.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from d2d.client import RegistryClient

    settings = cli_settings(args)
    endpoints = resolve_endpoints(settings)

    async def work() -> int:
        async with RegistryClient(endpoints.addr("registry")) as registry:
            handler = {
                "list": _models_list, "show": _models_show, "train": _models_train, "promote": _models_promote,
                "rollback": _models_rollback, "reproduce": _models_reproduce, "policy": _models_policy,
            }[args.action]  # fmt: skip
            return await handler(registry, args, settings, endpoints)

    return run_rpc(work())


async def _models_list(registry, args, settings, endpoints) -> int:  # noqa: ANN001
    table = Table(title="models")
    for col in ("model", "versions", "aliases", "latest AUC"):
        table.add_column(col)
    for model in await registry.list_models():
        name = model.name.removeprefix("models/")
        versions = await registry.list_versions(name)
        latest = json.loads(versions[-1].evaluation_json).get("auc") if versions else None
        aliases = ", ".join(f"{a}={v}" for a, v in sorted(model.aliases.items()))
        table.add_row(name, str(len(versions)), aliases, f"{latest:.4f}" if latest is not None else "")
    console.print(table)
    return 0


async def _models_show(registry, args, settings, endpoints) -> int:  # noqa: ANN001
    model = await registry.get_model(args.model)
    versions = await registry.list_versions(args.model)
    by_version = {}
    for alias, version in model.aliases.items():
        by_version.setdefault(version, []).append(alias)
    table = Table(title=f"{model.name}: {model.description}")
    for col in ("version", "aliases", "sha256", "AUC", "log loss", "Brier", "test rows", "log range", "created"):
        table.add_column(col)
    for v in versions:
        number = v.name.rsplit("/", 1)[1]
        ev, lineage = json.loads(v.evaluation_json), json.loads(v.lineage_json)
        table.add_row(
            number, ", ".join(by_version.get(number, [])), v.sha256[:12],
            f"{ev.get('auc') or 0:.4f}", f"{ev.get('log_loss', 0):.4f}", f"{ev.get('brier', 0):.4f}",
            str(lineage.get("rows", {}).get("test", "")), "..".join(str(x) for x in lineage.get("log_range", [])),
            v.create_time.ToDatetime().isoformat(timespec="seconds"),
        )  # fmt: skip
    console.print(table)
    history = Table(title="alias history (from the log)")
    for col in ("seq", "alias", "from", "to", "reason"):
        history.add_column(col)
    for c in model.alias_history:
        history.add_row(str(c.seq), c.alias, c.previous_version or "-", c.version or "(removed)", c.reason)
    console.print(history)
    if args.version:
        v = await registry.get_version(args.model, args.version)
        ev = json.loads(v.evaluation_json)
        calibration = Table(title=f"{v.name}: calibration on the held-out test split")
        for col in ("bin", "rows", "mean predicted", "observed rate"):
            calibration.add_column(col, justify="right")
        for b in ev.get("calibration", []):
            if b["count"]:
                calibration.add_row(
                    f"{b['bin_lower']:.1f}-{b['bin_upper']:.1f}", str(b["count"]),
                    f"{b['mean_predicted']:.4f}", f"{b['observed_rate']:.4f}",
                )  # fmt: skip
        console.print(calibration)
        slices = Table(title="per slice")
        for col in ("slice", "value", "rows", "positives", "AUC", "log loss"):
            slices.add_column(col)
        for name, values in ev.get("slices", {}).items():
            for value, m in values.items():
                auc = f"{m['auc']:.4f}" if m.get("auc") is not None else "-"
                slices.add_row(name, value, str(m["rows"]), str(m["positives"]), auc, f"{m['log_loss']:.4f}")
        console.print(slices)
        if (ev.get("truth") or {}).get("auc") is not None:
            console.print(f"truth: AUC {ev['truth']['auc']:.4f} on the same {ev['truth']['rows']} held-out rows")
        console.print("spec:")
        console.print_json(v.spec_json)
    return 0


def _default_spec(settings: Settings, rounds: int | None, truth: str | None = None) -> str:
    import importlib

    from d2d.training.spec import TrainingSpec

    module = importlib.import_module(settings.training_defaults_module)
    default_spec = getattr(module, "default_spec", None)
    if default_spec is None:
        raise SystemExit(f"{settings.training_defaults_module} (D2D_TRAINING_DEFAULTS) has no default_spec(); "
                         "pass --spec FILE")  # fmt: skip
    spec: TrainingSpec = default_spec()
    d = spec.to_dict()
    if rounds:
        d["num_boost_round"] = rounds
    if truth:
        d["truth_path"] = str(Path(truth).resolve())
    return json.dumps(d)


@contextlib.contextmanager
def _progress_bar() -> Iterator[Callable[..., None]]:
    """A bar that follows a training stream: pass what it yields as `on_progress`."""
    from rich.progress import BarColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), console=console) as bar:
        task = bar.add_task("training", total=1.0)

        def show(update) -> None:  # noqa: ANN001
            bar.update(task, completed=update.fraction, description=f"{update.stage}: {update.message}"[:70])

        yield show


async def _models_train(registry, args, settings, endpoints) -> int:  # noqa: ANN001
    import grpc

    spec = Path(args.spec).read_text() if args.spec else _default_spec(settings, args.rounds, args.truth)  # noqa: ASYNC240
    try:
        await registry.get_model(args.model)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        await registry.create_model(args.model, args.description)
    with _progress_bar() as show:
        version = await registry.train(args.model, spec, on_progress=show)
    ev = json.loads(version.evaluation_json)
    console.print(
        f"registered {version.name}: sha256 {version.sha256[:16]}..., test AUC {ev['auc']:.4f}, "
        f"log loss {ev['log_loss']:.4f} (base rate {ev['base_rate_log_loss']:.4f}), Brier {ev['brier']:.4f}"
    )
    if (ev.get("truth") or {}).get("auc") is not None:
        console.print(
            f"the true probabilities score AUC {ev['truth']['auc']:.4f} on the same {ev['truth']['rows']} rows"
        )
    return 0


async def _models_promote(registry, args, settings, endpoints) -> int:  # noqa: ANN001
    margin = None if args.no_gate else args.margin
    model = await registry.set_alias(
        args.model, args.alias, args.version, require_improvement=margin, reason=args.reason
    )
    console.print(f"{args.alias} of {model.name} is version {model.aliases[args.alias]}")
    return 0


async def _models_rollback(registry, args, settings, endpoints) -> int:  # noqa: ANN001
    model = await registry.get_model(args.model)
    changes = [c for c in model.alias_history if c.alias == args.alias]
    if not changes or not changes[-1].previous_version:
        console.print(f"[red]{args.alias} of {model.name} has no earlier version to roll back to[/red]")
        return 1
    target = changes[-1].previous_version
    model = await registry.set_alias(args.model, args.alias, target, reason=f"rollback from {changes[-1].version}")
    console.print(f"{args.alias} of {model.name} rolled back to version {target}")
    return 0


async def _models_policy(registry, args, settings, endpoints) -> int:  # noqa: ANN001
    from d2d.errors import Refusal
    from d2d.policies import deployment_dict_from_proto, describe, policy_from_dict

    model = await registry.get_model(args.model)
    if args.policy_json is not None or args.canary_share is not None:
        current = deployment_dict_from_proto(model.deployment_policy)
        try:
            given = json.loads(args.policy_json) if args.policy_json is not None else current
            policy = policy_from_dict(given, "--set")
        except ValueError as exc:
            raise SystemExit(f"--set is not JSON: {exc}") from None
        except Refusal as refusal:
            raise SystemExit(refusal.message) from None
        share = args.canary_share if args.canary_share is not None else current["canary_share"]
        model = await registry.set_policy(args.model, policy, canary_share=share)
    shown = deployment_dict_from_proto(model.deployment_policy)
    console.print(f"{model.name}: {describe(shown)}; canary share {shown['canary_share']:g}")
    return 0


async def _models_reproduce(registry, args, settings, endpoints) -> int:  # noqa: ANN001
    with _progress_bar() as show:
        result = await registry.reproduce(args.model, args.version, on_progress=show)
    verdict = "[green]identical[/green]" if result.identical else "[red]DIFFERENT[/red]"
    console.print(
        f"retrained {result.name} from its stored spec in {result.duration.ToTimedelta().total_seconds():.1f}s: "
        f"sha256 {result.retrained_sha256[:16]}... vs stored {result.stored_sha256[:16]}...: {verdict}"
    )
    for d in result.differences:  # values are JSON: no rich markup
        console.print(f"  {d.field}: stored {d.stored[:60]}, retrained {d.retrained[:60]}", markup=False)
    return 0 if result.identical else 1
