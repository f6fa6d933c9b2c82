"""The one place where errors become gRPC statuses (API.md's status table)."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from domain import correlation
from domain.errors import (
    ConflictError,
    DeadlineExceededError,
    DomainError,
    NotFoundError,
    OverloadedError,
    PreconditionError,
    UnauthenticatedError,
    UnavailableError,
    ValidationError,
)

log = logging.getLogger(__name__)

# Most specific first: the first matching class wins.
STATUS_TABLE: tuple[tuple[type[DomainError], grpc.StatusCode], ...] = (
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.ABORTED),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def code_for(error: BaseException) -> grpc.StatusCode:
    for kind, code in STATUS_TABLE:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def to_status(error: BaseException) -> grpc.Status:
    """The rich status for an error; unexpected errors say nothing of their insides."""
    code = code_for(error)
    if code is grpc.StatusCode.INTERNAL:
        message = f"internal error (correlation id {correlation.current() or '-'})"
    else:
        message = str(error)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if isinstance(error, ValidationError):
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.violations
                ]
            )
        )
        status.details.append(detail)
    return rpc_status.to_status(status)
