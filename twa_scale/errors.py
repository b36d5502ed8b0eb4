"""Error classes and the exit-code taxonomy of every twa_scale job.

A restart policy (Kubernetes ``podFailurePolicy``, JobSet ``failurePolicy``, a shell loop) can only
see a process's exit status, so every launch path (``launch/*.py`` through
:func:`twa_scale.cli.launch_main`, and ``launch/k8s-entry.sh``) ends with one of these:

======  ==================  ==================================================================
status  name                meaning, and what a restart policy should do
======  ==================  ==================================================================
0       ``EXIT_OK``         done.
2       ``EXIT_CONFIG``     bad configuration or bad input (flag, URL, dataset, snapshot, refused
                            credentials): permanent; retrying cannot help. Fail at once.
75      ``EXIT_TEMPFAIL``   transient infrastructure (``EX_TEMPFAIL``, sysexits.h): the store is
                            unreachable at start, the rendezvous timed out, pod 0 stayed
                            Pending. Restart (the job resumes from its newest checkpoint).
143     ``EXIT_PREEMPTED``  SIGTERM (128 + 15): preemption, eviction, node drain. Pending
                            snapshots were flushed within the deadline. Restart and resume.
other   (1, 134, 137, ...)  a bug, a crash or the OOM killer: restart a bounded number of times.
======  ==================  ==================================================================

Raise :class:`ConfigError` (a ``ValueError``, so existing ``except ValueError`` keeps working) for
permanent problems and :class:`TransientError` for transient ones; modules may subclass both
(e.g. a store's ``StoreUnreachableError(TransientError)``). :func:`exit_code` maps any exception.
"""
from __future__ import annotations

import os

__all__ = ["EXPECTED_ERRORS", "EXIT_CONFIG", "EXIT_OK", "EXIT_PREEMPTED", "EXIT_TEMPFAIL", "ConfigError",
           "StoreUnreachableError",
           "TransientError", "TwaScaleError", "auth_error_code", "exit_code", "is_connection_error", "is_transient"]

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_TEMPFAIL = getattr(os, "EX_TEMPFAIL", 75)
EXIT_PREEMPTED = 128 + 15


class TwaScaleError(Exception):
    """Base of the errors twa_scale raises on purpose (one-line message, no traceback needed)."""

    exit_status = 1


class ConfigError(TwaScaleError, ValueError):
    """Bad configuration or input: permanent, exit 2. The message names the thing at fault."""

    exit_status = EXIT_CONFIG


class TransientError(TwaScaleError):
    """Transient infrastructure failure (store unreachable, rendezvous timeout): exit 75, restart."""

    exit_status = EXIT_TEMPFAIL


class StoreUnreachableError(TransientError, OSError):
    """The object store did not answer (connection refused, timeout, DNS): transient, exit 75.

    Also an ``OSError``, so code that catches store I/O errors still catches it. A store that answers
    "access denied" or "no such bucket" is a configuration problem (``PermissionError``/``ConfigError``).
    """


# Bad input that a launch script or the CLI reports as one line with exit 2 (besides ConfigError): a
# missing file or object, a refused permission, a malformed value, an uncommitted snapshot seq.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                    IsADirectoryError, PermissionError, KeyError)


def is_connection_error(exc: BaseException) -> bool:
    """A network-level failure to reach a server (refused, reset, timed out, DNS), in any library:
    the builtin ``ConnectionError``/``TimeoutError``, botocore's ``EndpointConnectionError`` and
    ``ConnectTimeoutError``, aiohttp's ``ClientConnectorError`` (matched by name, so no import)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        names = {c.__name__ for c in type(exc).__mro__}
        if names & {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
                    "ServerTimeoutError", "ConnectionClosedError"}:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# S3 error codes that mean the store rejected who we are (a bad key id, a wrong secret, an expired or
# malformed token) or refused the request as an identity: permanent, a configuration problem.
# The most specific first: a text that holds several names the credential problem, not the status.
AUTH_ERROR_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "TokenRefreshRequired", "InvalidClientTokenId", "AuthorizationHeaderMalformed",
                    "MissingSecurityHeader", "AccessDenied", "Forbidden", "403")


def auth_error_code(exc: BaseException) -> str | None:
    """The S3 error code (``SignatureDoesNotMatch``, ``AccessDenied``, ``403`` ...) when ``exc`` or one of its
    causes is the store refusing our credentials, else None. botocore's ``ClientError`` carries the code in
    ``response["Error"]["Code"]``; a HEAD answers a bare 403 (no body, so no code); obstore's
    ``PermissionDeniedError``/``UnauthenticatedError`` carry it in their text; missing credentials
    (``NoCredentialsError``) count too."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            err = response.get("Error") or {}
            code = str(err.get("Code") or "")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in AUTH_ERROR_CODES:
                return code
            if status == 403:
                return code or "403"
        name = type(exc).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return name
        if name in ("PermissionDeniedError", "UnauthenticatedError"):  # obstore's: the S3 code is in the text
            return next((c for c in AUTH_ERROR_CODES if c in str(exc) and not c.isdigit()), name)
        exc = exc.__cause__ or exc.__context__
    return None


def _transient_torch_error(exc: BaseException) -> bool:
    """torch.distributed's rendezvous failures: the TCP store timed out or its host is unreachable."""
    try:
        from torch.distributed import DistNetworkError, DistStoreError
    except ImportError:  # older torch
        return False
    return isinstance(exc, (DistStoreError, DistNetworkError))


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TransientError) or _transient_torch_error(exc)


def exit_code(exc: BaseException, permanent: tuple[type[BaseException], ...] = (ValueError,)) -> int | None:
    """The exit status for ``exc``, or None when it is not an expected error (a bug: keep the traceback).

    Transient wins over permanent, so a ``TransientError`` that is also an ``OSError`` is still 75.
    ``permanent`` are the further types a launch script treats as bad input (exit 2).
    """
    if isinstance(exc, SystemExit):  # streamer.Preempted (143), argparse (2)
        return exc.code if isinstance(exc.code, int) else 1
    if is_transient(exc):
        return EXIT_TEMPFAIL
    if isinstance(exc, (ConfigError, *permanent)):
        return EXIT_CONFIG
    return None
