from d2d.v1 import access_pb2 as _access_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("model", "entities", "context", "unit_id", "request_id", "min_feature_watermark")
    class EntitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    UNIT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_FEATURE_WATERMARK_FIELD_NUMBER: _ClassVar[int]
    model: str
    entities: _containers.ScalarMap[str, str]
    context: _struct_pb2.Struct
    unit_id: str
    request_id: str
    min_feature_watermark: int
    def __init__(self, model: _Optional[str] = ..., entities: _Optional[_Mapping[str, str]] = ..., context: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., unit_id: _Optional[str] = ..., request_id: _Optional[str] = ..., min_feature_watermark: _Optional[int] = ...) -> None: ...

class ShadowScore(_message.Message):
    __slots__ = ("model_version", "score")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    score: float
    def __init__(self, model_version: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("decision_id", "score", "action", "propensity", "model_version", "arm", "feature_watermark", "unknown_entities", "shadow_scores", "explored", "seq")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    PROPENSITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    FEATURE_WATERMARK_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ENTITIES_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SCORES_FIELD_NUMBER: _ClassVar[int]
    EXPLORED_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    score: float
    action: str
    propensity: float
    model_version: str
    arm: str
    feature_watermark: int
    unknown_entities: _containers.RepeatedScalarFieldContainer[str]
    shadow_scores: _containers.RepeatedCompositeFieldContainer[ShadowScore]
    explored: bool
    seq: int
    def __init__(self, decision_id: _Optional[str] = ..., score: _Optional[float] = ..., action: _Optional[str] = ..., propensity: _Optional[float] = ..., model_version: _Optional[str] = ..., arm: _Optional[str] = ..., feature_watermark: _Optional[int] = ..., unknown_entities: _Optional[_Iterable[str]] = ..., shadow_scores: _Optional[_Iterable[_Union[ShadowScore, _Mapping]]] = ..., explored: _Optional[bool] = ..., seq: _Optional[int] = ...) -> None: ...

class BatchPredictRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[PredictRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[PredictRequest, _Mapping]]] = ...) -> None: ...

class BatchPredictResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[PredictResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[PredictResponse, _Mapping]]] = ...) -> None: ...
