"""Replay, audit and counterfactual evaluation, recomputed from the log alone.

One module per operation, each an async function over an `EventLog` (or the database URL, for the
runs that spread over worker processes) returning a JSON-ready dict, raising `d2d.errors.Refusal`
for a request that cannot be answered (the AuditService answers it with its status):

- `state.replay_state`: derived state as of a log position or time;
- `explain.explain`: one decision and everything that led to it;
- `rescore.rescore`: logged decisions scored by another model version;
- `ope.evaluate_policy`: a candidate policy's value from logged decisions (IPS, SNIPS, DR);
- `verify.verify`: every derived state recomputed and compared, every logged vector checked.

`log` holds what they share: model versions and their artifacts as the log names them, and the
logged decisions with their outcomes. Long runs report progress through a `Progress` callback.
"""
