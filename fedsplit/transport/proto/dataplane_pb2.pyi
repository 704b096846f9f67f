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
    __slots__ = ("run", "caller", "data_owner", "step", "micro_batch", "op", "phase", "num_tensors", "shm_request", "shm_reply", "shm_reply_capacity", "shm_pool", "shm_released")
    RUN_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    DATA_OWNER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    SHM_REQUEST_FIELD_NUMBER: _ClassVar[int]
    SHM_REPLY_FIELD_NUMBER: _ClassVar[int]
    SHM_REPLY_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    SHM_POOL_FIELD_NUMBER: _ClassVar[int]
    SHM_RELEASED_FIELD_NUMBER: _ClassVar[int]
    run: str
    caller: str
    data_owner: str
    step: int
    micro_batch: int
    op: str
    phase: Phase
    num_tensors: int
    shm_request: str
    shm_reply: str
    shm_reply_capacity: int
    shm_pool: str
    shm_released: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run: _Optional[str] = ..., caller: _Optional[str] = ..., data_owner: _Optional[str] = ..., step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., op: _Optional[str] = ..., phase: _Optional[_Union[Phase, str]] = ..., num_tensors: _Optional[int] = ..., shm_request: _Optional[str] = ..., shm_reply: _Optional[str] = ..., shm_reply_capacity: _Optional[int] = ..., shm_pool: _Optional[str] = ..., shm_released: _Optional[_Iterable[str]] = ...) -> None: ...

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
