"""The simulator's training defaults: its label (a chargeback within 30 days of a payment), the
spec `d2d models train` uses without `--spec`, a new model's deployment policy (its actions,
approve and decline) and the promotion policy of a model without one — named by
`D2D_TRAINING_DEFAULTS`, see `d2d.config`.

Payments-domain choices live here, not in `d2d.training`: the platform's spec names no event type,
field or window of its own.
"""

from __future__ import annotations

from d2d.sim.views import TRANSFORMS, VIEWS
from d2d.training.labels import LabelDefinition
from d2d.training.spec import TrainingSpec

CHARGEBACK_LABEL = LabelDefinition(
    example_type="payment.authorized",
    outcome_type="payment.chargeback",
    join_field="payment_id",
    window_seconds=30 * 86400,
)


# What a decision earned, by action and label: an approved payment earns its margin unless it is
# charged back; a declined one earns nothing (and shows nothing: selective labels).
REWARD = {"approve": {"0": 1.0, "1": -20.0}, "decline": 0.0}


def default_reward() -> dict[str, object]:
    """The reward table policies are valued with off-policy (`d2d report`, the demo's comparison)."""
    return {"approve": dict(REWARD["approve"]), "decline": REWARD["decline"]}


def default_spec() -> TrainingSpec:
    """The served views and transforms, the chargeback label, the payment's amount and channel as
    request inputs, evaluation sliced by channel and merchant category, truth joined on payment_id."""
    return TrainingSpec(
        views=tuple((v.name, v.version) for v in VIEWS),
        label=CHARGEBACK_LABEL,
        request_numbers=("amount",),
        request_flags=(("channel", "ecom"),),
        transforms=TRANSFORMS,
        slice_fields=("channel",),
        slice_lookups=(("merchant_category", "merchant.onboarded", "merchant_id", "category"),),
        truth_key="payment_id",
        truth_column="fraud_probability",
    )


def default_policy() -> dict[str, object]:
    """A new model's deployment policy: approve below the threshold, decline at or above it; no
    canary, no exploration until a policy is set."""
    return {"canary_share": 0.0, "epsilon": 0.0, "threshold": 0.5, "actions": ["approve", "decline"]}


def default_promotion_policy() -> dict[str, object]:
    """How the registry promotes a retrained candidate of a model with no promotion policy of its
    own: a tenth of units on the canary; a verdict once it has made 2,000 decisions with 200 labels
    (a chargeback takes days, so labels trail decisions); promoted when its live AUC is at least
    production's, rolled back when worse, or when 50,000 decisions have not brought the labels."""
    return {"canary_share": 0.1, "min_decisions": 2000, "min_labels": 200, "margin": 0.0, "max_decisions": 50000}
