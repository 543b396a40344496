import datetime

from d2d.v1 import access_pb2 as _access_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Model(_message.Message):
    __slots__ = ("name", "description", "aliases", "alias_history", "create_time", "deployment_policy", "promotion_policy", "promotion_policy_is_default")
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    ALIAS_HISTORY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_POLICY_FIELD_NUMBER: _ClassVar[int]
    PROMOTION_POLICY_FIELD_NUMBER: _ClassVar[int]
    PROMOTION_POLICY_IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    aliases: _containers.ScalarMap[str, str]
    alias_history: _containers.RepeatedCompositeFieldContainer[AliasChange]
    create_time: _timestamp_pb2.Timestamp
    deployment_policy: DeploymentPolicy
    promotion_policy: PromotionPolicy
    promotion_policy_is_default: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., aliases: _Optional[_Mapping[str, str]] = ..., alias_history: _Optional[_Iterable[_Union[AliasChange, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deployment_policy: _Optional[_Union[DeploymentPolicy, _Mapping]] = ..., promotion_policy: _Optional[_Union[PromotionPolicy, _Mapping]] = ..., promotion_policy_is_default: _Optional[bool] = ...) -> None: ...

class PromotionPolicy(_message.Message):
    __slots__ = ("canary_share", "min_decisions", "min_labels", "margin", "max_decisions")
    CANARY_SHARE_FIELD_NUMBER: _ClassVar[int]
    MIN_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_LABELS_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    MAX_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    canary_share: float
    min_decisions: int
    min_labels: int
    margin: float
    max_decisions: int
    def __init__(self, canary_share: _Optional[float] = ..., min_decisions: _Optional[int] = ..., min_labels: _Optional[int] = ..., margin: _Optional[float] = ..., max_decisions: _Optional[int] = ...) -> None: ...

class DeploymentPolicy(_message.Message):
    __slots__ = ("canary_share", "epsilon", "threshold", "actions", "kind", "exploration", "temperature", "utilities")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[DeploymentPolicy.Kind]
        THRESHOLD: _ClassVar[DeploymentPolicy.Kind]
        BEST_ACTION: _ClassVar[DeploymentPolicy.Kind]
    KIND_UNSPECIFIED: DeploymentPolicy.Kind
    THRESHOLD: DeploymentPolicy.Kind
    BEST_ACTION: DeploymentPolicy.Kind
    class Exploration(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        EXPLORATION_UNSPECIFIED: _ClassVar[DeploymentPolicy.Exploration]
        EPSILON_GREEDY: _ClassVar[DeploymentPolicy.Exploration]
        SOFTMAX: _ClassVar[DeploymentPolicy.Exploration]
    EXPLORATION_UNSPECIFIED: DeploymentPolicy.Exploration
    EPSILON_GREEDY: DeploymentPolicy.Exploration
    SOFTMAX: DeploymentPolicy.Exploration
    CANARY_SHARE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EXPLORATION_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    UTILITIES_FIELD_NUMBER: _ClassVar[int]
    canary_share: float
    epsilon: float
    threshold: float
    actions: _containers.RepeatedScalarFieldContainer[str]
    kind: DeploymentPolicy.Kind
    exploration: DeploymentPolicy.Exploration
    temperature: float
    utilities: _containers.RepeatedCompositeFieldContainer[ActionUtility]
    def __init__(self, canary_share: _Optional[float] = ..., epsilon: _Optional[float] = ..., threshold: _Optional[float] = ..., actions: _Optional[_Iterable[str]] = ..., kind: _Optional[_Union[DeploymentPolicy.Kind, str]] = ..., exploration: _Optional[_Union[DeploymentPolicy.Exploration, str]] = ..., temperature: _Optional[float] = ..., utilities: _Optional[_Iterable[_Union[ActionUtility, _Mapping]]] = ...) -> None: ...

class ActionUtility(_message.Message):
    __slots__ = ("action", "weight", "bias")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    action: str
    weight: float
    bias: float
    def __init__(self, action: _Optional[str] = ..., weight: _Optional[float] = ..., bias: _Optional[float] = ...) -> None: ...

class UpdateModelRequest(_message.Message):
    __slots__ = ("model", "update_mask")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    model: Model
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class AliasChange(_message.Message):
    __slots__ = ("alias", "version", "previous_version", "seq", "time", "reason")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    alias: str
    version: str
    previous_version: str
    seq: int
    time: _timestamp_pb2.Timestamp
    reason: str
    def __init__(self, alias: _Optional[str] = ..., version: _Optional[str] = ..., previous_version: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("name", "sha256", "artifact_bytes", "spec_json", "evaluation_json", "lineage_json", "feature_names", "registered_seq", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_JSON_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_JSON_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_SEQ_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    artifact_bytes: int
    spec_json: str
    evaluation_json: str
    lineage_json: str
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    registered_seq: int
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., artifact_bytes: _Optional[int] = ..., spec_json: _Optional[str] = ..., evaluation_json: _Optional[str] = ..., lineage_json: _Optional[str] = ..., feature_names: _Optional[_Iterable[str]] = ..., registered_seq: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("model_id", "model")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model: Model
    def __init__(self, model_id: _Optional[str] = ..., model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class TrainModelVersionRequest(_message.Message):
    __slots__ = ("parent", "spec_json")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    parent: str
    spec_json: str
    def __init__(self, parent: _Optional[str] = ..., spec_json: _Optional[str] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("stage", "message", "fraction", "model_version", "reproduction")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPRODUCTION_FIELD_NUMBER: _ClassVar[int]
    stage: str
    message: str
    fraction: float
    model_version: ModelVersion
    reproduction: Reproduction
    def __init__(self, stage: _Optional[str] = ..., message: _Optional[str] = ..., fraction: _Optional[float] = ..., model_version: _Optional[_Union[ModelVersion, _Mapping]] = ..., reproduction: _Optional[_Union[Reproduction, _Mapping]] = ...) -> None: ...

class ReproduceModelVersionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Reproduction(_message.Message):
    __slots__ = ("name", "stored_sha256", "retrained_sha256", "identical", "duration", "differences")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STORED_SHA256_FIELD_NUMBER: _ClassVar[int]
    RETRAINED_SHA256_FIELD_NUMBER: _ClassVar[int]
    IDENTICAL_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    DIFFERENCES_FIELD_NUMBER: _ClassVar[int]
    name: str
    stored_sha256: str
    retrained_sha256: str
    identical: bool
    duration: _duration_pb2.Duration
    differences: _containers.RepeatedCompositeFieldContainer[ReproductionDifference]
    def __init__(self, name: _Optional[str] = ..., stored_sha256: _Optional[str] = ..., retrained_sha256: _Optional[str] = ..., identical: _Optional[bool] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., differences: _Optional[_Iterable[_Union[ReproductionDifference, _Mapping]]] = ...) -> None: ...

class ReproductionDifference(_message.Message):
    __slots__ = ("field", "stored", "retrained")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    RETRAINED_FIELD_NUMBER: _ClassVar[int]
    field: str
    stored: str
    retrained: str
    def __init__(self, field: _Optional[str] = ..., stored: _Optional[str] = ..., retrained: _Optional[str] = ...) -> None: ...

class RegisterModelVersionRequest(_message.Message):
    __slots__ = ("parent", "artifact", "spec_json", "evaluation_json", "feature_names")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_JSON_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    parent: str
    artifact: bytes
    spec_json: str
    evaluation_json: str
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, parent: _Optional[str] = ..., artifact: _Optional[bytes] = ..., spec_json: _Optional[str] = ..., evaluation_json: _Optional[str] = ..., feature_names: _Optional[_Iterable[str]] = ...) -> None: ...

class GetModelVersionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListModelVersionsRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelVersionsResponse(_message.Message):
    __slots__ = ("model_versions", "next_page_token")
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model_versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    next_page_token: str
    def __init__(self, model_versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("data", "sha256", "total_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    sha256: str
    total_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., sha256: _Optional[str] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("name", "alias", "version", "require_improvement", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_IMPROVEMENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    version: str
    require_improvement: float
    reason: str
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[str] = ..., require_improvement: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class DeleteAliasRequest(_message.Message):
    __slots__ = ("name", "alias")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ...) -> None: ...
