"""Errors our code raises on purpose. No gRPC here: the ML core raises these and the
runtime (services.common.status) maps them to status codes, in one place.

The message is for the caller: name the field and the limit, e.g.
    InvalidArgument("params.top_p must be in (0, 1], got 1.5")
"""


class ServiceError(Exception):
    """Base class; never raised itself."""


class InvalidArgument(ServiceError):
    """The request is malformed or out of range; retrying it unchanged will fail again."""


class ResourceExhausted(ServiceError):
    """A queue, batch or size limit is reached; retry later or send less."""


class FailedPrecondition(ServiceError):
    """The request is valid but the server's state refuses it (a version that does not go up,
    weights that do not fit the model, a replica at the wrong version)."""


class Unavailable(ServiceError):
    """Loading, draining or a dependency down; safe to retry."""


class DeadlineExceeded(ServiceError):
    """The server's own time limit ran out (e.g. a client stream that went quiet)."""


class NotFound(ServiceError):
    """A named thing (checkpoint, tensor) does not exist."""


class Unauthenticated(ServiceError):
    """Missing or wrong credentials."""


class PermissionDenied(ServiceError):
    """Credentials are valid but do not allow this call."""
