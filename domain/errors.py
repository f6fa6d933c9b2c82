"""Domain errors: what went wrong, in the domain's words; the server maps each to a status code.

DomainError
├── ValidationError          a request field breaks a rule (carries field violations)
├── NotFoundError            the order or SKU does not exist
├── ConflictError            a version check failed, or retries could not resolve a race
├── PreconditionError        the operation does not apply in the current state
│   ├── InvalidTransitionError   e.g. cancelling a FAILED order
│   └── IdempotencyKeyReusedError  request_id reused with another payload
├── UnauthenticatedError     no valid credentials for a protected service
├── PermissionDeniedError    valid credentials that do not allow this call
├── OverloadedError          the service is over a concurrency or rate limit
├── UnavailableError         storage unreachable, shutting down
└── DeadlineExceededError    the caller's deadline passed before the work finished
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One broken rule on one request field (`field` uses the proto field path, e.g. `items[2].sku`)."""

    field: str
    description: str


class DomainError(Exception):
    """Base of every error the domain raises on purpose."""


class ValidationError(DomainError):
    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = tuple(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


class NotFoundError(DomainError):
    pass


class ConflictError(DomainError):
    pass


class PreconditionError(DomainError):
    pass


class InvalidTransitionError(PreconditionError):
    pass


class IdempotencyKeyReusedError(PreconditionError):
    pass


class UnauthenticatedError(DomainError):
    pass


class PermissionDeniedError(DomainError):
    pass


class OverloadedError(DomainError):
    pass


class UnavailableError(DomainError):
    pass


class DeadlineExceededError(DomainError):
    pass
