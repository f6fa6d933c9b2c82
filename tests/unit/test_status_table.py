"""Domain errors become the status codes of API.md's table; unexpected errors leak nothing."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from domain import correlation
from domain.errors import (
    ConflictError,
    DeadlineExceededError,
    DomainError,
    FieldViolation,
    IdempotencyKeyReusedError,
    InvalidTransitionError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    PreconditionError,
    UnavailableError,
    ValidationError,
)
from server.errors import code_for, to_status

DETAILS_KEY = "grpc-status-details-bin"


def _rich_status(status: grpc.Status) -> status_pb2.Status:
    metadata = dict(status.trailing_metadata)
    return status_pb2.Status.FromString(metadata[DETAILS_KEY])


def _bad_request(status: grpc.Status) -> error_details_pb2.BadRequest:
    (detail,) = _rich_status(status).details
    assert detail.Is(error_details_pb2.BadRequest.DESCRIPTOR)
    bad_request = error_details_pb2.BadRequest()
    detail.Unpack(bad_request)
    return bad_request


TABLE = [
    pytest.param(
        ValidationError([FieldViolation("customer_id", "must not be empty")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        id="validation",
    ),
    pytest.param(NotFoundError("order 1 not found"), grpc.StatusCode.NOT_FOUND, id="not-found"),
    pytest.param(ConflictError("expected version 3, found 4"), grpc.StatusCode.ABORTED, id="conflict"),
    pytest.param(
        InvalidTransitionError("order is FAILED"),
        grpc.StatusCode.FAILED_PRECONDITION,
        id="invalid-transition",
    ),
    pytest.param(
        IdempotencyKeyReusedError("request_id reused"),
        grpc.StatusCode.FAILED_PRECONDITION,
        id="idempotency-key-reused",
    ),
    pytest.param(PreconditionError("not now"), grpc.StatusCode.FAILED_PRECONDITION, id="precondition"),
    pytest.param(
        PermissionDeniedError("this token lacks the scope inventory:write"),
        grpc.StatusCode.PERMISSION_DENIED,
        id="permission-denied",
    ),
    pytest.param(OverloadedError("too many calls"), grpc.StatusCode.RESOURCE_EXHAUSTED, id="overloaded"),
    pytest.param(UnavailableError("database unreachable"), grpc.StatusCode.UNAVAILABLE, id="unavailable"),
    pytest.param(DeadlineExceededError("deadline passed"), grpc.StatusCode.DEADLINE_EXCEEDED, id="deadline"),
]


@pytest.mark.parametrize(("error", "code"), TABLE)
def test_each_domain_error_maps_to_its_api_status_code(error: DomainError, code: grpc.StatusCode) -> None:
    assert code_for(error) is code
    status = to_status(error)
    assert status.code is code
    assert _rich_status(status).code == getattr(code_pb2, code.name)


@pytest.mark.parametrize(("error", "code"), [p for p in TABLE if p.id != "validation"])
def test_expected_errors_keep_their_message_and_carry_no_details(
    error: DomainError, code: grpc.StatusCode
) -> None:
    status = to_status(error)
    assert status.details == str(error)
    rich = _rich_status(status)
    assert rich.message == str(error)
    assert list(rich.details) == []


def test_validation_error_carries_every_field_violation_as_bad_request_details() -> None:
    error = ValidationError(
        [
            FieldViolation("customer_id", "must not be empty"),
            FieldViolation("items[2].quantity", "must be between 1 and 10000"),
            FieldViolation("items[3].sku", "SKU 'A' appears more than once"),
        ]
    )
    bad_request = _bad_request(to_status(error))
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("customer_id", "must not be empty"),
        ("items[2].quantity", "must be between 1 and 10000"),
        ("items[3].sku", "SKU 'A' appears more than once"),
    ]


def test_validation_status_message_names_the_fields() -> None:
    status = to_status(ValidationError([FieldViolation("items[2].quantity", "must be between 1 and 10000")]))
    assert "items[2].quantity" in status.details


def test_non_ascii_field_descriptions_survive_the_rich_status() -> None:
    error = ValidationError([FieldViolation("items[0].sku", "SKU 'ü' may contain only letters")])
    (violation,) = _bad_request(to_status(error)).field_violations
    assert violation.description == "SKU 'ü' may contain only letters"


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("SELECT secret FROM x"),
        KeyError("password"),
        ValueError('relation "orders" does not exist\nLINE 1: SELECT * FROM orders'),
        ZeroDivisionError("division by zero"),
        DomainError("a domain error with no row in the table"),
    ],
    ids=["runtime-sql", "key", "value-sql", "zero-division", "bare-domain-error"],
)
def test_unexpected_error_is_internal_and_says_nothing_of_its_insides(error: BaseException) -> None:
    try:
        raise error
    except BaseException as raised:  # a real traceback is attached, as in a handler
        status = to_status(raised)
    assert status.code is grpc.StatusCode.INTERNAL
    text = str(error).strip("'")
    for message in (status.details, _rich_status(status).message):
        assert text not in message
        assert "SELECT" not in message
        assert "Traceback" not in message
        assert type(error).__name__ not in message
    assert list(_rich_status(status).details) == []


def test_internal_error_message_gives_the_correlation_id_to_quote() -> None:
    with correlation.bound("corr-123"):
        status = to_status(RuntimeError("SELECT secret FROM x"))
    assert "corr-123" in status.details
