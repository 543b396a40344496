"""One payment through the platform from Python: append it, ask for a decision, record the outcome.

    export D2D_API_KEY=$(cat .d2d/admin.key)   # a key whose role may append, predict and record
    python examples/python/predict.py --model fraud

The key needs the `producer` role (AppendEvents) and the `app` role (Predict, RecordOutcome): an
admin key has both. Addresses come from the flags, else D2D_INGEST_ADDR, D2D_SERVING_ADDR and
D2D_FEEDBACK_ADDR, else the defaults `d2d up` listens on. Uses the library client `d2d.client`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import uuid
from datetime import UTC, datetime

import grpc

from d2d.client import FeedbackClient, IngestClient, ServingClient, make_event


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingest", default=os.environ.get("D2D_INGEST_ADDR", "127.0.0.1:50051"))
    parser.add_argument("--serving", default=os.environ.get("D2D_SERVING_ADDR", "127.0.0.1:50054"))
    parser.add_argument("--feedback", default=os.environ.get("D2D_FEEDBACK_ADDR", "127.0.0.1:50055"))
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--customer", default="cus_000001")
    parser.add_argument("--merchant", default="mer_0001")
    parser.add_argument("--card", default="card_000001_1")
    parser.add_argument("--amount", type=float, default=120.0)
    parser.add_argument("--label", type=int, default=0, help="the outcome to record: 1 if it was fraud")
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    api_key = os.environ["D2D_API_KEY"]  # sent on every call as `authorization: Bearer <key>`
    now = datetime.now(UTC)
    payment_id = f"pay_{random.randrange(10**11, 10**12)}"
    payment = {
        "payment_id": payment_id, "customer_id": args.customer, "merchant_id": args.merchant,
        "card_id": args.card, "amount": args.amount, "currency": "EUR", "channel": "ecom",
        "ip_country": "DE", "device_id": f"dev_{uuid.uuid4().hex[:12]}",
    }  # fmt: skip

    # 1. The payment is a fact: append it to the log (validated against its contract).
    async with IngestClient(args.ingest, api_key) as ingest:
        response = await ingest.append(
            [make_event("payment.authorized", "payment", payment_id, payment, occurred_at=now)]
        )
    [result] = response.results
    if result.HasField("error"):
        raise SystemExit(f"refused: {result.error.message}")
    print(f"appended payment {payment_id} at log seq {result.seq}")

    # 2. A decision on it, on features that already count this payment (min_feature_watermark).
    async with ServingClient(args.serving, api_key) as serving:
        request = ServingClient.request(
            args.model, {"customer": args.customer, "merchant": args.merchant, "card": args.card},
            {**payment, "occurred_at": now.isoformat()}, unit_id=args.customer, request_id=payment_id,
        )  # fmt: skip
        request.min_feature_watermark = result.seq
        decision = await serving.stub.Predict(request, timeout=10)
    print(
        f"decision {decision.decision_id}: {decision.action} (score {decision.score:.4f}, "
        f"{decision.model_version}, {decision.arm}, features as of seq {decision.feature_watermark})"
    )

    # 3. Later, what happened: the decision's outcome, which live metrics and retraining learn from.
    async with FeedbackClient(args.feedback, api_key) as feedback:
        outcome = await feedback.record_outcome(decision.decision_id, label=args.label)
    print(f"outcome {outcome.name}: label {outcome.label} at log seq {outcome.seq}")


if __name__ == "__main__":
    try:
        asyncio.run(main(parse_args()))
    except grpc.aio.AioRpcError as error:  # the status says what to fix, e.g. NOT_FOUND: models/x does not exist
        raise SystemExit(f"{error.code().name}: {error.details()}") from None
