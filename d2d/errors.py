"""The one error type for refused input, shared by every module that checks what callers send."""

from __future__ import annotations


class Refusal(Exception):
    """Why input was refused: a gRPC status code name, the offending field, and what to fix.

    `retry_after` (seconds) is set for refusals a caller should retry later (RESOURCE_EXHAUSTED,
    UNAVAILABLE); the gRPC layer sends it as `google.rpc.RetryInfo`.
    """

    def __init__(self, code: str, message: str, field: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after
