"""The simulator's upcasters: where a payments contract's version N+1 that reshapes a payload ships
the function that upgrades version-N payloads (see `d2d.contracts.upcasting`).

Every simulator contract is at version 1, so there is none yet. One would read::

    @upcaster("payment.authorized", from_version=1)
    def payment_authorized_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
        return {**without(payload, "amount"), "money": {"amount": payload["amount"], "currency": "EUR"}}

and registering the v2 contract records `"upcaster": "d2d.sim.upcasters:payment_authorized_v1_v2"` in its
`contract.registered` event.
"""

from __future__ import annotations
