"""The one place that maps our exceptions to gRPC status codes."""
from __future__ import annotations

import logging

import grpc

from services.common import errors

log = logging.getLogger(__name__)

CODES: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def to_status(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """Status for an exception that escaped a handler. Anything unexpected is INTERNAL
    (logged with its traceback), never UNKNOWN."""
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls], str(exc)
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "server out of memory"
    log.exception("unexpected error in %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}: {exc}"


# The same errors on HTTP front ends (the feedback service).
HTTP_CODES: dict[type[errors.ServiceError], int] = {
    errors.InvalidArgument: 400,
    errors.Unauthenticated: 401,
    errors.PermissionDenied: 403,
    errors.NotFound: 404,
    errors.FailedPrecondition: 409,
    errors.ResourceExhausted: 429,
    errors.Unavailable: 503,
    errors.DeadlineExceeded: 504,
}


def to_http(exc: errors.ServiceError) -> int:
    return next((HTTP_CODES[cls] for cls in type(exc).__mro__ if cls in HTTP_CODES), 500)
