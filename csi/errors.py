"""Domain errors, each carrying the gRPC status code it maps to.

This is the one place status codes are decided (containerd's errdefs): storage, image and
volume code raise these; the server's interceptor turns them into `context.abort(code, msg)`.
Any other exception reaching the interceptor is a bug and becomes a logged INTERNAL.
"""

import grpc


class StrataError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(StrataError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(StrataError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(StrataError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(StrataError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(StrataError):
    """The registry refused our credentials (or we had none it would accept)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(StrataError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(StrataError):
    code = grpc.StatusCode.UNAVAILABLE


class Aborted(StrataError):
    code = grpc.StatusCode.ABORTED


class DataLoss(StrataError):
    """Content did not match its digest; the bad bytes were discarded."""

    code = grpc.StatusCode.DATA_LOSS


class Internal(StrataError):
    code = grpc.StatusCode.INTERNAL
