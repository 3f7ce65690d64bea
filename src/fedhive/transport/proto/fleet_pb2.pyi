from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Frame(_message.Message):
    __slots__ = ("kind", "message_id", "total_size", "offset", "data", "last", "protocol_version", "node_id", "token", "text", "data_port")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Frame.Kind]
        HELLO: _ClassVar[Frame.Kind]
        WELCOME: _ClassVar[Frame.Kind]
        MESSAGE: _ClassVar[Frame.Kind]
        HEARTBEAT: _ClassVar[Frame.Kind]
        ERROR: _ClassVar[Frame.Kind]
        BYE: _ClassVar[Frame.Kind]
        BULK: _ClassVar[Frame.Kind]
        TICKET: _ClassVar[Frame.Kind]
    KIND_UNSPECIFIED: Frame.Kind
    HELLO: Frame.Kind
    WELCOME: Frame.Kind
    MESSAGE: Frame.Kind
    HEARTBEAT: Frame.Kind
    ERROR: Frame.Kind
    BYE: Frame.Kind
    BULK: Frame.Kind
    TICKET: Frame.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    kind: Frame.Kind
    message_id: str
    total_size: int
    offset: int
    data: bytes
    last: bool
    protocol_version: int
    node_id: str
    token: str
    text: str
    data_port: int
    def __init__(self, kind: _Optional[_Union[Frame.Kind, str]] = ..., message_id: _Optional[str] = ..., total_size: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., protocol_version: _Optional[int] = ..., node_id: _Optional[str] = ..., token: _Optional[str] = ..., text: _Optional[str] = ..., data_port: _Optional[int] = ...) -> None: ...
