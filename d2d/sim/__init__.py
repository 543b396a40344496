"""Deterministic payments-domain simulator with known fraud truth (see ``payments``)."""

from d2d.sim.payments import (
    ContractSpec,
    PaymentsSimulator,
    PaymentTruth,
    SimConfig,
    SimEvent,
    load_contracts,
    write_truth_csv,
)

__all__ = [
    "ContractSpec",
    "PaymentTruth",
    "PaymentsSimulator",
    "SimConfig",
    "SimEvent",
    "load_contracts",
    "write_truth_csv",
]
