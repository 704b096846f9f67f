from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    FORWARD: _ClassVar[Phase]
    BACKWARD: _ClassVar[Phase]
    CONTROL: _ClassVar[Phase]
    EVALUATE: _ClassVar[Phase]
PHASE_UNSPECIFIED: Phase
FORWARD: Phase
BACKWARD: Phase
CONTROL: Phase
EVALUATE: Phase

class CallHeader(_message.Message):
    __slots__ = ("run", "caller", "data_owner", "step", "micro_batch", "phase", "num_tensors", "shm_request", "shm_reply", "shm_reply_capacity", "shm_pool", "shm_released", "operation", "control", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    DATA_OWNER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    SHM_REQUEST_FIELD_NUMBER: _ClassVar[int]
    SHM_REPLY_FIELD_NUMBER: _ClassVar[int]
    SHM_REPLY_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    SHM_POOL_FIELD_NUMBER: _ClassVar[int]
    SHM_RELEASED_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    run: str
    caller: str
    data_owner: str
    step: int
    micro_batch: int
    phase: Phase
    num_tensors: int
    shm_request: str
    shm_reply: str
    shm_reply_capacity: int
    shm_pool: str
    shm_released: _containers.RepeatedScalarFieldContainer[str]
    operation: Operation
    control: Control
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, run: _Optional[str] = ..., caller: _Optional[str] = ..., data_owner: _Optional[str] = ..., step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., num_tensors: _Optional[int] = ..., shm_request: _Optional[str] = ..., shm_reply: _Optional[str] = ..., shm_reply_capacity: _Optional[int] = ..., shm_pool: _Optional[str] = ..., shm_released: _Optional[_Iterable[str]] = ..., operation: _Optional[_Union[Operation, _Mapping]] = ..., control: _Optional[_Union[Control, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("segment", "heads", "experts", "shared")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    segment: Segment
    heads: HeadGroup
    experts: ExpertRows
    shared: SharedExperts
    def __init__(self, segment: _Optional[_Union[Segment, _Mapping]] = ..., heads: _Optional[_Union[HeadGroup, _Mapping]] = ..., experts: _Optional[_Union[ExpertRows, _Mapping]] = ..., shared: _Optional[_Union[SharedExperts, _Mapping]] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("embed", "layers", "final_norm", "lm_head", "task")
    EMBED_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    FINAL_NORM_FIELD_NUMBER: _ClassVar[int]
    LM_HEAD_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    embed: bool
    layers: _containers.RepeatedScalarFieldContainer[int]
    final_norm: bool
    lm_head: bool
    task: str
    def __init__(self, embed: _Optional[bool] = ..., layers: _Optional[_Iterable[int]] = ..., final_norm: _Optional[bool] = ..., lm_head: _Optional[bool] = ..., task: _Optional[str] = ...) -> None: ...

class HeadGroup(_message.Message):
    __slots__ = ("layer", "kv_start", "kv_stop")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KV_START_FIELD_NUMBER: _ClassVar[int]
    KV_STOP_FIELD_NUMBER: _ClassVar[int]
    layer: int
    kv_start: int
    kv_stop: int
    def __init__(self, layer: _Optional[int] = ..., kv_start: _Optional[int] = ..., kv_stop: _Optional[int] = ...) -> None: ...

class ExpertRows(_message.Message):
    __slots__ = ("layer", "experts", "rows")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ..., rows: _Optional[_Iterable[int]] = ...) -> None: ...

class SharedExperts(_message.Message):
    __slots__ = ("layer",)
    LAYER_FIELD_NUMBER: _ClassVar[int]
    layer: int
    def __init__(self, layer: _Optional[int] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("connect", "begin", "wait", "train_batch", "apply_step", "read_state", "load_state", "read_traffic", "await_round", "finish_step", "abort_round", "replica_gradients", "reduce_norm", "read_memory", "end_run")
    CONNECT_FIELD_NUMBER: _ClassVar[int]
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_BATCH_FIELD_NUMBER: _ClassVar[int]
    APPLY_STEP_FIELD_NUMBER: _ClassVar[int]
    READ_STATE_FIELD_NUMBER: _ClassVar[int]
    LOAD_STATE_FIELD_NUMBER: _ClassVar[int]
    READ_TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    AWAIT_ROUND_FIELD_NUMBER: _ClassVar[int]
    FINISH_STEP_FIELD_NUMBER: _ClassVar[int]
    ABORT_ROUND_FIELD_NUMBER: _ClassVar[int]
    REPLICA_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    REDUCE_NORM_FIELD_NUMBER: _ClassVar[int]
    READ_MEMORY_FIELD_NUMBER: _ClassVar[int]
    END_RUN_FIELD_NUMBER: _ClassVar[int]
    connect: Connect
    begin: Begin
    wait: Wait
    train_batch: TrainBatch
    apply_step: ApplyStep
    read_state: ReadState
    load_state: LoadState
    read_traffic: ReadTraffic
    await_round: AwaitRound
    finish_step: FinishStep
    abort_round: AbortRound
    replica_gradients: ReplicaGradients
    reduce_norm: ReduceNorm
    read_memory: ReadMemory
    end_run: EndRun
    def __init__(self, connect: _Optional[_Union[Connect, _Mapping]] = ..., begin: _Optional[_Union[Begin, _Mapping]] = ..., wait: _Optional[_Union[Wait, _Mapping]] = ..., train_batch: _Optional[_Union[TrainBatch, _Mapping]] = ..., apply_step: _Optional[_Union[ApplyStep, _Mapping]] = ..., read_state: _Optional[_Union[ReadState, _Mapping]] = ..., load_state: _Optional[_Union[LoadState, _Mapping]] = ..., read_traffic: _Optional[_Union[ReadTraffic, _Mapping]] = ..., await_round: _Optional[_Union[AwaitRound, _Mapping]] = ..., finish_step: _Optional[_Union[FinishStep, _Mapping]] = ..., abort_round: _Optional[_Union[AbortRound, _Mapping]] = ..., replica_gradients: _Optional[_Union[ReplicaGradients, _Mapping]] = ..., reduce_norm: _Optional[_Union[ReduceNorm, _Mapping]] = ..., read_memory: _Optional[_Union[ReadMemory, _Mapping]] = ..., end_run: _Optional[_Union[EndRun, _Mapping]] = ...) -> None: ...

class Connect(_message.Message):
    __slots__ = ("addresses",)
    class AddressesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    addresses: _containers.ScalarMap[str, str]
    def __init__(self, addresses: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Begin(_message.Message):
    __slots__ = ("round", "first_step", "steps", "data_owners", "restore_round", "evaluate", "attempt", "evaluate_after")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    DATA_OWNERS_FIELD_NUMBER: _ClassVar[int]
    RESTORE_ROUND_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_AFTER_FIELD_NUMBER: _ClassVar[int]
    round: int
    first_step: int
    steps: int
    data_owners: _containers.RepeatedScalarFieldContainer[str]
    restore_round: int
    evaluate: bool
    attempt: int
    evaluate_after: bool
    def __init__(self, round: _Optional[int] = ..., first_step: _Optional[int] = ..., steps: _Optional[int] = ..., data_owners: _Optional[_Iterable[str]] = ..., restore_round: _Optional[int] = ..., evaluate: _Optional[bool] = ..., attempt: _Optional[int] = ..., evaluate_after: _Optional[bool] = ...) -> None: ...

class Wait(_message.Message):
    __slots__ = ("timeout_s",)
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    timeout_s: float
    def __init__(self, timeout_s: _Optional[float] = ...) -> None: ...

class TrainBatch(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class ApplyStep(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class ReadState(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadState(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadTraffic(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadMemory(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EndRun(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AwaitRound(_message.Message):
    __slots__ = ("round", "attempt")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    round: int
    attempt: int
    def __init__(self, round: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class FinishStep(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class AbortRound(_message.Message):
    __slots__ = ("round", "reason", "attempt")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    round: int
    reason: str
    attempt: int
    def __init__(self, round: _Optional[int] = ..., reason: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class ReduceNorm(_message.Message):
    __slots__ = ("step", "squared")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SQUARED_FIELD_NUMBER: _ClassVar[int]
    step: int
    squared: float
    def __init__(self, step: _Optional[int] = ..., squared: _Optional[float] = ...) -> None: ...

class ReplicaGradients(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes", "absent", "codec", "in_shm", "shm_offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ABSENT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    IN_SHM_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    absent: bool
    codec: str
    in_shm: bool
    shm_offset: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., absent: _Optional[bool] = ..., codec: _Optional[str] = ..., in_shm: _Optional[bool] = ..., shm_offset: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("call", "tensor", "chunk")
    CALL_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    call: CallHeader
    tensor: TensorHeader
    chunk: bytes
    def __init__(self, call: _Optional[_Union[CallHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class Frames(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Frame]
    def __init__(self, frames: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ...) -> None: ...
