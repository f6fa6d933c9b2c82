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
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
    UnavailableError,
    ValidationError,
)

log = logging.getLogger(__name__)

# Status message and details travel as trailers, which clients cap at 8 KiB by default: a request with
# 100 bad items must still get its INVALID_ARGUMENT, so the report is bounded.
MAX_VIOLATIONS = 25
MAX_VIOLATIONS_IN_MESSAGE = 5
MAX_DESCRIPTION_CHARS = 160
MAX_MESSAGE_CHARS = 1024

# Most specific first: the first matching class wins.
STATUS_TABLE: tuple[tuple[type[DomainError], grpc.StatusCode], ...] = (
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.ABORTED),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
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
    elif isinstance(error, ValidationError):
        shown = error.violations[:MAX_VIOLATIONS_IN_MESSAGE]
        message = "; ".join(f"{v.field}: {v.description}" for v in shown)
        if len(error.violations) > len(shown):
            message += f"; and {len(error.violations) - len(shown)} more (see the BadRequest details)"
    else:
        message = str(error)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message[:MAX_MESSAGE_CHARS])
    if isinstance(error, ValidationError):
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description[:MAX_DESCRIPTION_CHARS]
                    )
                    for v in error.violations[:MAX_VIOLATIONS]
                ]
            )
        )
        status.details.append(detail)
    return rpc_status.to_status(status)
