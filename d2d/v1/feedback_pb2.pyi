import datetime

from d2d.v1 import access_pb2 as _access_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetModelMetricsRequest(_message.Message):
    __slots__ = ("name", "start_time", "end_time", "positive_action")
    NAME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_ACTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    positive_action: str
    def __init__(self, name: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., positive_action: _Optional[str] = ...) -> None: ...

class ModelMetrics(_message.Message):
    __slots__ = ("name", "arms", "position")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    name: str
    arms: _containers.RepeatedCompositeFieldContainer[ArmMetrics]
    position: int
    def __init__(self, name: _Optional[str] = ..., arms: _Optional[_Iterable[_Union[ArmMetrics, _Mapping]]] = ..., position: _Optional[int] = ...) -> None: ...

class ArmMetrics(_message.Message):
    __slots__ = ("model_version", "arm", "decisions", "labelled", "auc", "metrics_json")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    AUC_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    arm: str
    decisions: int
    labelled: int
    auc: float
    metrics_json: str
    def __init__(self, model_version: _Optional[str] = ..., arm: _Optional[str] = ..., decisions: _Optional[int] = ..., labelled: _Optional[int] = ..., auc: _Optional[float] = ..., metrics_json: _Optional[str] = ...) -> None: ...

class Outcome(_message.Message):
    __slots__ = ("name", "decision", "outcome_id", "label", "reward", "occur_time", "source", "rule", "cause_event_id", "window_closed", "seq", "record_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    OCCUR_TIME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    CAUSE_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_CLOSED_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RECORD_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    decision: str
    outcome_id: str
    label: int
    reward: float
    occur_time: _timestamp_pb2.Timestamp
    source: str
    rule: str
    cause_event_id: str
    window_closed: bool
    seq: int
    record_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., decision: _Optional[str] = ..., outcome_id: _Optional[str] = ..., label: _Optional[int] = ..., reward: _Optional[float] = ..., occur_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., rule: _Optional[str] = ..., cause_event_id: _Optional[str] = ..., window_closed: _Optional[bool] = ..., seq: _Optional[int] = ..., record_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RecordOutcomeRequest(_message.Message):
    __slots__ = ("outcome",)
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    outcome: Outcome
    def __init__(self, outcome: _Optional[_Union[Outcome, _Mapping]] = ...) -> None: ...

class GetOutcomeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class OutcomeRule(_message.Message):
    __slots__ = ("name", "event_type", "event_key", "decision_key", "label", "reward", "window", "otherwise_label", "otherwise_reward", "observed_actions", "allowed_lateness", "registered_seq", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    EVENT_KEY_FIELD_NUMBER: _ClassVar[int]
    DECISION_KEY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    OTHERWISE_LABEL_FIELD_NUMBER: _ClassVar[int]
    OTHERWISE_REWARD_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_LATENESS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_SEQ_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    event_type: str
    event_key: str
    decision_key: str
    label: int
    reward: float
    window: _duration_pb2.Duration
    otherwise_label: int
    otherwise_reward: float
    observed_actions: _containers.RepeatedScalarFieldContainer[str]
    allowed_lateness: _duration_pb2.Duration
    registered_seq: int
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., event_type: _Optional[str] = ..., event_key: _Optional[str] = ..., decision_key: _Optional[str] = ..., label: _Optional[int] = ..., reward: _Optional[float] = ..., window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., otherwise_label: _Optional[int] = ..., otherwise_reward: _Optional[float] = ..., observed_actions: _Optional[_Iterable[str]] = ..., allowed_lateness: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., registered_seq: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateOutcomeRuleRequest(_message.Message):
    __slots__ = ("outcome_rule_id", "outcome_rule")
    OUTCOME_RULE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_RULE_FIELD_NUMBER: _ClassVar[int]
    outcome_rule_id: str
    outcome_rule: OutcomeRule
    def __init__(self, outcome_rule_id: _Optional[str] = ..., outcome_rule: _Optional[_Union[OutcomeRule, _Mapping]] = ...) -> None: ...

class GetOutcomeRuleRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListOutcomeRulesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListOutcomeRulesResponse(_message.Message):
    __slots__ = ("outcome_rules", "next_page_token")
    OUTCOME_RULES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    outcome_rules: _containers.RepeatedCompositeFieldContainer[OutcomeRule]
    next_page_token: str
    def __init__(self, outcome_rules: _Optional[_Iterable[_Union[OutcomeRule, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
