import datetime

from d2d.v1 import access_pb2 as _access_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetReplayStateRequest(_message.Message):
    __slots__ = ("seq", "time", "entities")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time: _timestamp_pb2.Timestamp
    entities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., entities: _Optional[_Iterable[str]] = ...) -> None: ...

class ReplayState(_message.Message):
    __slots__ = ("seq", "state_json")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    state_json: str
    def __init__(self, seq: _Optional[int] = ..., state_json: _Optional[str] = ...) -> None: ...

class ExplainDecisionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DecisionExplanation(_message.Message):
    __slots__ = ("name", "model_version", "trace_id", "explanation_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_version: str
    trace_id: str
    explanation_json: str
    def __init__(self, name: _Optional[str] = ..., model_version: _Optional[str] = ..., trace_id: _Optional[str] = ..., explanation_json: _Optional[str] = ...) -> None: ...

class RescoreDecisionsRequest(_message.Message):
    __slots__ = ("model_version", "model", "after_seq", "to_seq", "recompute_features")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    TO_SEQ_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_FEATURES_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    model: str
    after_seq: int
    to_seq: int
    recompute_features: bool
    def __init__(self, model_version: _Optional[str] = ..., model: _Optional[str] = ..., after_seq: _Optional[int] = ..., to_seq: _Optional[int] = ..., recompute_features: _Optional[bool] = ...) -> None: ...

class EvaluatePolicyRequest(_message.Message):
    __slots__ = ("model_version", "policy_json", "model", "after_seq", "to_seq", "clip", "bootstrap", "reward_json", "seed")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    TO_SEQ_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_FIELD_NUMBER: _ClassVar[int]
    REWARD_JSON_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    policy_json: str
    model: str
    after_seq: int
    to_seq: int
    clip: float
    bootstrap: int
    reward_json: str
    seed: int
    def __init__(self, model_version: _Optional[str] = ..., policy_json: _Optional[str] = ..., model: _Optional[str] = ..., after_seq: _Optional[int] = ..., to_seq: _Optional[int] = ..., clip: _Optional[float] = ..., bootstrap: _Optional[int] = ..., reward_json: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class VerifyLogRequest(_message.Message):
    __slots__ = ("workers", "skip_projections")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    SKIP_PROJECTIONS_FIELD_NUMBER: _ClassVar[int]
    workers: int
    skip_projections: bool
    def __init__(self, workers: _Optional[int] = ..., skip_projections: _Optional[bool] = ...) -> None: ...

class ReplayProgress(_message.Message):
    __slots__ = ("stage", "done", "total", "result_json")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    stage: str
    done: int
    total: int
    result_json: str
    def __init__(self, stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., result_json: _Optional[str] = ...) -> None: ...
