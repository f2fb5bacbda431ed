"""The error types of weft_core: one per layer.

`WeftError` is what the CLI turns into a one-line message and an exit code.
`ApiError` is what the control API turns into a 4xx JSON body.
"""

from __future__ import annotations


class ExitCode:
    """Exit codes scripts can trust (documented in docs/operations.md)."""

    OK = 0
    FAILURE = 1  # unexpected runtime failure
    USAGE = 2  # bad command line, bad URL, unknown scheme
    LOGIN_REFUSED = 3  # the server refused the secret, or the server could not prove it
    UNREACHABLE = 4  # the server could not be reached
    ROUTE_REFUSED = 5  # the server refused the route (port taken, not allowed)
    MISSING_DEPENDENCY = 6  # wireguard or nftables not available


class WeftError(Exception):
    """An error with a message meant for the user and the exit code it maps to."""

    def __init__(self, message: str, exit_code: int = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class UsageError(WeftError):
    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.USAGE)


class ApiError(Exception):
    """A control-API failure: HTTP status, stable machine code, human message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
