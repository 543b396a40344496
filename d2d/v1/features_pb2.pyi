import datetime

from d2d.v1 import access_pb2 as _access_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeatureView(_message.Message):
    __slots__ = ("name", "version", "entity", "source", "features", "allowed_lateness_seconds", "definition_json", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_LATENESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_JSON_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    entity: str
    source: str
    features: _containers.RepeatedScalarFieldContainer[str]
    allowed_lateness_seconds: int
    definition_json: str
    description: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., entity: _Optional[str] = ..., source: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ..., allowed_lateness_seconds: _Optional[int] = ..., definition_json: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class FeatureValue(_message.Message):
    __slots__ = ("number_value", "string_value", "bool_value", "null_value")
    NUMBER_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    NULL_VALUE_FIELD_NUMBER: _ClassVar[int]
    number_value: float
    string_value: str
    bool_value: bool
    null_value: bool
    def __init__(self, number_value: _Optional[float] = ..., string_value: _Optional[str] = ..., bool_value: _Optional[bool] = ..., null_value: _Optional[bool] = ...) -> None: ...

class EntityRow(_message.Message):
    __slots__ = ("keys", "as_of")
    class KeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEYS_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.ScalarMap[str, str]
    as_of: _timestamp_pb2.Timestamp
    def __init__(self, keys: _Optional[_Mapping[str, str]] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetOnlineFeaturesRequest(_message.Message):
    __slots__ = ("features", "rows", "as_of")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedScalarFieldContainer[str]
    rows: _containers.RepeatedCompositeFieldContainer[EntityRow]
    as_of: _timestamp_pb2.Timestamp
    def __init__(self, features: _Optional[_Iterable[str]] = ..., rows: _Optional[_Iterable[_Union[EntityRow, _Mapping]]] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class FeatureRow(_message.Message):
    __slots__ = ("values", "as_of", "unknown_entities")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ENTITIES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[FeatureValue]
    as_of: _timestamp_pb2.Timestamp
    unknown_entities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[_Union[FeatureValue, _Mapping]]] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., unknown_entities: _Optional[_Iterable[str]] = ...) -> None: ...

class GetOnlineFeaturesResponse(_message.Message):
    __slots__ = ("feature_names", "rows", "watermark", "as_of", "dropped_late")
    class DroppedLateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    DROPPED_LATE_FIELD_NUMBER: _ClassVar[int]
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    rows: _containers.RepeatedCompositeFieldContainer[FeatureRow]
    watermark: int
    as_of: _timestamp_pb2.Timestamp
    dropped_late: _containers.ScalarMap[str, int]
    def __init__(self, feature_names: _Optional[_Iterable[str]] = ..., rows: _Optional[_Iterable[_Union[FeatureRow, _Mapping]]] = ..., watermark: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., dropped_late: _Optional[_Mapping[str, int]] = ...) -> None: ...

class GetFeatureViewRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListFeatureViewsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListFeatureViewsResponse(_message.Message):
    __slots__ = ("feature_views", "next_page_token")
    FEATURE_VIEWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    feature_views: _containers.RepeatedCompositeFieldContainer[FeatureView]
    next_page_token: str
    def __init__(self, feature_views: _Optional[_Iterable[_Union[FeatureView, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExportTrainingFrameRequest(_message.Message):
    __slots__ = ("feature_views", "from_event_type", "limit", "rows")
    FEATURE_VIEWS_FIELD_NUMBER: _ClassVar[int]
    FROM_EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    feature_views: _containers.RepeatedScalarFieldContainer[str]
    from_event_type: str
    limit: int
    rows: _containers.RepeatedCompositeFieldContainer[TrainingFrameRow]
    def __init__(self, feature_views: _Optional[_Iterable[str]] = ..., from_event_type: _Optional[str] = ..., limit: _Optional[int] = ..., rows: _Optional[_Iterable[_Union[TrainingFrameRow, _Mapping]]] = ...) -> None: ...

class TrainingFrameRow(_message.Message):
    __slots__ = ("keys", "as_of", "watermark")
    class KeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEYS_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.ScalarMap[str, str]
    as_of: _timestamp_pb2.Timestamp
    watermark: int
    def __init__(self, keys: _Optional[_Mapping[str, str]] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., watermark: _Optional[int] = ...) -> None: ...

class TrainingFrameChunk(_message.Message):
    __slots__ = ("data", "rows", "columns", "total_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    rows: int
    columns: _containers.RepeatedScalarFieldContainer[str]
    total_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., rows: _Optional[int] = ..., columns: _Optional[_Iterable[str]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class CheckFeatureSkewRequest(_message.Message):
    __slots__ = ("feature_views", "sample", "as_of", "seed", "rows")
    FEATURE_VIEWS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    feature_views: _containers.RepeatedScalarFieldContainer[str]
    sample: int
    as_of: _timestamp_pb2.Timestamp
    seed: int
    rows: _containers.RepeatedCompositeFieldContainer[EntityRow]
    def __init__(self, feature_views: _Optional[_Iterable[str]] = ..., sample: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., seed: _Optional[int] = ..., rows: _Optional[_Iterable[_Union[EntityRow, _Mapping]]] = ...) -> None: ...

class FeatureSkewMismatch(_message.Message):
    __slots__ = ("keys", "feature", "online_value", "offline_value")
    class KeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEYS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    ONLINE_VALUE_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_VALUE_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.ScalarMap[str, str]
    feature: str
    online_value: FeatureValue
    offline_value: FeatureValue
    def __init__(self, keys: _Optional[_Mapping[str, str]] = ..., feature: _Optional[str] = ..., online_value: _Optional[_Union[FeatureValue, _Mapping]] = ..., offline_value: _Optional[_Union[FeatureValue, _Mapping]] = ...) -> None: ...

class FeatureSkewReport(_message.Message):
    __slots__ = ("checked_rows", "checked_values", "watermark", "as_of", "mismatches", "mismatch_count")
    CHECKED_ROWS_FIELD_NUMBER: _ClassVar[int]
    CHECKED_VALUES_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    MISMATCHES_FIELD_NUMBER: _ClassVar[int]
    MISMATCH_COUNT_FIELD_NUMBER: _ClassVar[int]
    checked_rows: int
    checked_values: int
    watermark: int
    as_of: _timestamp_pb2.Timestamp
    mismatches: _containers.RepeatedCompositeFieldContainer[FeatureSkewMismatch]
    mismatch_count: int
    def __init__(self, checked_rows: _Optional[int] = ..., checked_values: _Optional[int] = ..., watermark: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., mismatches: _Optional[_Iterable[_Union[FeatureSkewMismatch, _Mapping]]] = ..., mismatch_count: _Optional[int] = ...) -> None: ...
