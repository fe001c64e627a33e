"""Domain errors, each carrying the gRPC status code it maps to.

This is the one place status codes are decided (containerd's errdefs): storage, image and
volume code raise these; the server's interceptor turns them into `context.abort(code, msg)`.
Any other exception reaching the interceptor is a bug and becomes a logged INTERNAL.
"""

import errno
import sqlite3

import grpc

# The store's filesystem, or the quota on it, is full.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


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


def is_no_space(e: BaseException) -> bool:
    """A full disk, as an OSError says it or as SQLite does (SQLITE_FULL: state.db shares
    the store's filesystem, and a write to it may be the one that finds it full)."""
    if isinstance(e, sqlite3.Error):
        return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(e, OSError) and e.errno in NO_SPACE


def no_space(what: str) -> ResourceExhausted:
    """The one way a full disk reaches a client: RESOURCE_EXHAUSTED, naming what was being
    written (the kubelet retries; an operator frees space or lets GC do it)."""
    return ResourceExhausted(f"{what}: no space left on the store")
