import datetime

from d2d.v1 import access_pb2 as _access_pb2
from d2d.v1 import event_pb2 as _event_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CompatibilityMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPATIBILITY_MODE_UNSPECIFIED: _ClassVar[CompatibilityMode]
    NONE: _ClassVar[CompatibilityMode]
    BACKWARD: _ClassVar[CompatibilityMode]
    BACKWARD_TRANSITIVE: _ClassVar[CompatibilityMode]
    FORWARD: _ClassVar[CompatibilityMode]
    FORWARD_TRANSITIVE: _ClassVar[CompatibilityMode]
    FULL: _ClassVar[CompatibilityMode]
    FULL_TRANSITIVE: _ClassVar[CompatibilityMode]

class EventLogView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_LOG_VIEW_UNSPECIFIED: _ClassVar[EventLogView]
    EVENT_LOG_VIEW_BASIC: _ClassVar[EventLogView]
    EVENT_LOG_VIEW_FULL: _ClassVar[EventLogView]
COMPATIBILITY_MODE_UNSPECIFIED: CompatibilityMode
NONE: CompatibilityMode
BACKWARD: CompatibilityMode
BACKWARD_TRANSITIVE: CompatibilityMode
FORWARD: CompatibilityMode
FORWARD_TRANSITIVE: CompatibilityMode
FULL: CompatibilityMode
FULL_TRANSITIVE: CompatibilityMode
EVENT_LOG_VIEW_UNSPECIFIED: EventLogView
EVENT_LOG_VIEW_BASIC: EventLogView
EVENT_LOG_VIEW_FULL: EventLogView

class AppendEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_event_pb2.Event]
    def __init__(self, events: _Optional[_Iterable[_Union[_event_pb2.Event, _Mapping]]] = ...) -> None: ...

class EventResult(_message.Message):
    __slots__ = ("event_id", "seq", "error", "duplicate", "dead_letter")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTER_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    seq: int
    error: _status_pb2.Status
    duplicate: bool
    dead_letter: str
    def __init__(self, event_id: _Optional[str] = ..., seq: _Optional[int] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., duplicate: _Optional[bool] = ..., dead_letter: _Optional[str] = ...) -> None: ...

class AppendEventsResponse(_message.Message):
    __slots__ = ("results", "appended_count", "head_seq")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    APPENDED_COUNT_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EventResult]
    appended_count: int
    head_seq: int
    def __init__(self, results: _Optional[_Iterable[_Union[EventResult, _Mapping]]] = ..., appended_count: _Optional[int] = ..., head_seq: _Optional[int] = ...) -> None: ...

class StreamAppendEventsResponse(_message.Message):
    __slots__ = ("received_count", "appended_count", "duplicate_count", "rejected_count", "rejected", "head_seq")
    RECEIVED_COUNT_FIELD_NUMBER: _ClassVar[int]
    APPENDED_COUNT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    received_count: int
    appended_count: int
    duplicate_count: int
    rejected_count: int
    rejected: _containers.RepeatedCompositeFieldContainer[EventResult]
    head_seq: int
    def __init__(self, received_count: _Optional[int] = ..., appended_count: _Optional[int] = ..., duplicate_count: _Optional[int] = ..., rejected_count: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[EventResult, _Mapping]]] = ..., head_seq: _Optional[int] = ...) -> None: ...

class ContractVersion(_message.Message):
    __slots__ = ("name", "event_type", "version", "owner", "description", "json_schema", "pii_fields", "compatibility", "allowed_lateness", "null_rate_limits", "create_time", "registered_seq", "max_future_skew", "max_age")
    class NullRateLimitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    PII_FIELDS_FIELD_NUMBER: _ClassVar[int]
    COMPATIBILITY_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_LATENESS_FIELD_NUMBER: _ClassVar[int]
    NULL_RATE_LIMITS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_SEQ_FIELD_NUMBER: _ClassVar[int]
    MAX_FUTURE_SKEW_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    event_type: str
    version: int
    owner: str
    description: str
    json_schema: str
    pii_fields: _containers.RepeatedScalarFieldContainer[str]
    compatibility: CompatibilityMode
    allowed_lateness: _duration_pb2.Duration
    null_rate_limits: _containers.ScalarMap[str, float]
    create_time: _timestamp_pb2.Timestamp
    registered_seq: int
    max_future_skew: _duration_pb2.Duration
    max_age: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., event_type: _Optional[str] = ..., version: _Optional[int] = ..., owner: _Optional[str] = ..., description: _Optional[str] = ..., json_schema: _Optional[str] = ..., pii_fields: _Optional[_Iterable[str]] = ..., compatibility: _Optional[_Union[CompatibilityMode, str]] = ..., allowed_lateness: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., null_rate_limits: _Optional[_Mapping[str, float]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., registered_seq: _Optional[int] = ..., max_future_skew: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_age: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CreateContractVersionRequest(_message.Message):
    __slots__ = ("parent", "contract_version", "validate_only")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    parent: str
    contract_version: ContractVersion
    validate_only: bool
    def __init__(self, parent: _Optional[str] = ..., contract_version: _Optional[_Union[ContractVersion, _Mapping]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class GetContractVersionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListContractVersionsRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListContractVersionsResponse(_message.Message):
    __slots__ = ("contract_versions", "next_page_token")
    CONTRACT_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    contract_versions: _containers.RepeatedCompositeFieldContainer[ContractVersion]
    next_page_token: str
    def __init__(self, contract_versions: _Optional[_Iterable[_Union[ContractVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("name", "source", "event_id", "event_type", "raw", "raw_size", "raw_sha256", "error", "receive_time", "state", "redriven_seq")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[DeadLetter.State]
        PENDING: _ClassVar[DeadLetter.State]
        REDRIVEN: _ClassVar[DeadLetter.State]
    STATE_UNSPECIFIED: DeadLetter.State
    PENDING: DeadLetter.State
    REDRIVEN: DeadLetter.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    RAW_SHA256_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REDRIVEN_SEQ_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    event_id: str
    event_type: str
    raw: bytes
    raw_size: int
    raw_sha256: str
    error: _status_pb2.Status
    receive_time: _timestamp_pb2.Timestamp
    state: DeadLetter.State
    redriven_seq: int
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., event_id: _Optional[str] = ..., event_type: _Optional[str] = ..., raw: _Optional[bytes] = ..., raw_size: _Optional[int] = ..., raw_sha256: _Optional[str] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., receive_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[DeadLetter.State, str]] = ..., redriven_seq: _Optional[int] = ...) -> None: ...

class ListDeadLettersRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "event_type", "show_redriven")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SHOW_REDRIVEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    event_type: str
    show_redriven: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., event_type: _Optional[str] = ..., show_redriven: _Optional[bool] = ...) -> None: ...

class ListDeadLettersResponse(_message.Message):
    __slots__ = ("dead_letters", "next_page_token")
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    dead_letters: _containers.RepeatedCompositeFieldContainer[DeadLetter]
    next_page_token: str
    def __init__(self, dead_letters: _Optional[_Iterable[_Union[DeadLetter, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RedriveDeadLettersRequest(_message.Message):
    __slots__ = ("names", "event_type", "payload")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    event_type: str
    payload: bytes
    def __init__(self, names: _Optional[_Iterable[str]] = ..., event_type: _Optional[str] = ..., payload: _Optional[bytes] = ...) -> None: ...

class RedriveDeadLettersResponse(_message.Message):
    __slots__ = ("results", "redriven_count")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REDRIVEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EventResult]
    redriven_count: int
    def __init__(self, results: _Optional[_Iterable[_Union[EventResult, _Mapping]]] = ..., redriven_count: _Optional[int] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "event_type", "entity_type", "entity_id")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    ENTITY_TYPE_FIELD_NUMBER: _ClassVar[int]
    ENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    event_type: str
    entity_type: str
    entity_id: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., event_type: _Optional[str] = ..., entity_type: _Optional[str] = ..., entity_id: _Optional[str] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token", "head_seq")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_event_pb2.Event]
    next_page_token: str
    head_seq: int
    def __init__(self, events: _Optional[_Iterable[_Union[_event_pb2.Event, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., head_seq: _Optional[int] = ...) -> None: ...

class GetEventLogRequest(_message.Message):
    __slots__ = ("name", "view")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    name: str
    view: EventLogView
    def __init__(self, name: _Optional[str] = ..., view: _Optional[_Union[EventLogView, str]] = ...) -> None: ...

class EventLog(_message.Message):
    __slots__ = ("name", "head_seq", "published_seq", "pending_dead_letters", "event_counts")
    class EventCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_SEQ_FIELD_NUMBER: _ClassVar[int]
    PENDING_DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    head_seq: int
    published_seq: int
    pending_dead_letters: int
    event_counts: _containers.ScalarMap[str, int]
    def __init__(self, name: _Optional[str] = ..., head_seq: _Optional[int] = ..., published_seq: _Optional[int] = ..., pending_dead_letters: _Optional[int] = ..., event_counts: _Optional[_Mapping[str, int]] = ...) -> None: ...
