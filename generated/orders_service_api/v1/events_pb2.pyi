import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from orders_service_api.v1 import orders_pb2 as _orders_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OrderEvent(_message.Message):
    __slots__ = ("event_id", "order_id", "version", "status", "occur_time", "customer_id", "placed", "validated", "failed", "cancelled", "expired")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OCCUR_TIME_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PLACED_FIELD_NUMBER: _ClassVar[int]
    VALIDATED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    order_id: str
    version: int
    status: _orders_pb2.OrderStatus
    occur_time: _timestamp_pb2.Timestamp
    customer_id: str
    placed: OrderPlaced
    validated: OrderValidated
    failed: OrderFailed
    cancelled: OrderCancelled
    expired: OrderExpired
    def __init__(self, event_id: _Optional[str] = ..., order_id: _Optional[str] = ..., version: _Optional[int] = ..., status: _Optional[_Union[_orders_pb2.OrderStatus, str]] = ..., occur_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., customer_id: _Optional[str] = ..., placed: _Optional[_Union[OrderPlaced, _Mapping]] = ..., validated: _Optional[_Union[OrderValidated, _Mapping]] = ..., failed: _Optional[_Union[OrderFailed, _Mapping]] = ..., cancelled: _Optional[_Union[OrderCancelled, _Mapping]] = ..., expired: _Optional[_Union[OrderExpired, _Mapping]] = ...) -> None: ...

class OrderPlaced(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_orders_pb2.OrderItem]
    def __init__(self, items: _Optional[_Iterable[_Union[_orders_pb2.OrderItem, _Mapping]]] = ...) -> None: ...

class OrderValidated(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OrderFailed(_message.Message):
    __slots__ = ("failure_reason",)
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    failure_reason: str
    def __init__(self, failure_reason: _Optional[str] = ...) -> None: ...

class OrderCancelled(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OrderExpired(_message.Message):
    __slots__ = ("failure_reason",)
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    failure_reason: str
    def __init__(self, failure_reason: _Optional[str] = ...) -> None: ...
