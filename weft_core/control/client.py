"""The tunnel's client for the control API: login, then requests over the pinned certificate."""

from __future__ import annotations

import asyncio
import hmac
import ssl
import time
from typing import Any

import attrs

from .. import auth
from ..errors import ApiError, ExitCode, WeftError
from ..urls import ServerUrl
from .http import read_message, render_request

TIMEOUT = 10.0
RENEW_BEFORE = 300.0  # log in again when the token has less than this left


class LoginRefused(WeftError):
    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.LOGIN_REFUSED)


class ServerUnreachable(WeftError):
    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.UNREACHABLE)


def _tls_context() -> ssl.SSLContext:
    # No CA can vouch for a self-hosted server: the login proves the server instead (it seals the
    # challenge for the exact certificate we see), and we pin that certificate afterwards.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@attrs.frozen
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    fingerprint: bytes  # of the certificate this connection's server showed


class ControlClient:
    def __init__(self, server: ServerUrl, tunnel_id: str, timeout: float = TIMEOUT) -> None:
        self.server = server
        self.tunnel_id = tunnel_id
        self.timeout = timeout
        self._key = auth.derive_key(server.secret)
        self._tls = _tls_context()
        self.pinned: bytes | None = None
        self.token: str | None = None
        self.token_expires = 0.0
        self._conn: _Connection | None = None  # one kept alive; concurrent calls open their own
        self._login_lock = asyncio.Lock()  # concurrent calls (a health check asking for progress
        # while a route opens) re-login once, not each on top of the other

    async def _connect(self) -> _Connection:
        """A new TLS connection (its certificate is checked by `_exchange`)."""
        reader, writer = await asyncio.open_connection(
            self.server.host, self.server.port, ssl=self._tls, server_hostname=None
        )
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        if not der:
            writer.close()
            raise ServerUnreachable("the server presented no TLS certificate")
        return _Connection(reader, writer, auth.fingerprint(der))

    def close(self) -> None:
        """Close the kept-alive connection (if any)."""
        if self._conn is not None:
            self._conn.writer.close()
            self._conn = None

    async def _exchange(
        self,
        method: str,
        path: str,
        payload: Any,
        token: str | None,
        timeout: float | None = None,
        *,
        pinned: bool = True,
    ) -> tuple[int, Any, bytes]:
        """One request: (status, JSON body, certificate fingerprint).

        The connection is kept alive between requests (health checks need no new socket or TLS
        handshake); a kept connection the server has closed meanwhile is replaced once.
        """
        timeout = self.timeout if timeout is None else timeout
        if pinned and self.pinned is None:
            # Nothing goes out (a token least of all) before a login proved the certificate.
            raise ApiError(495, "not_logged_in", "no certificate proved by a login yet")
        request = render_request(method, path, self.server.address, payload, token)
        try:
            async with asyncio.timeout(timeout):
                expected = self.pinned  # now: a concurrent login may clear it meanwhile
                while True:
                    conn, self._conn = self._conn, None  # taken before any await
                    reused = conn is not None
                    if conn is None:
                        conn = await self._connect()
                    if pinned and not hmac.compare_digest(conn.fingerprint, expected or b""):
                        conn.writer.close()
                        # Never send the token to a certificate the login did not prove.
                        raise ApiError(
                            495, "certificate_changed", "the server's TLS certificate changed"
                        )
                    try:
                        conn.writer.write(request)
                        await conn.writer.drain()
                        response = await read_message(conn.reader, request=False)
                    except (OSError, asyncio.IncompleteReadError, ApiError):
                        conn.writer.close()
                        if reused:
                            continue  # the server closed the idle connection: once more, fresh
                        raise
                    if response.headers.get("connection", "").lower() == "close" or \
                            self._conn is not None:  # a concurrent call kept one already
                        conn.writer.close()
                    else:
                        self._conn = conn
                    break
        except TimeoutError:
            raise ServerUnreachable(
                f"no answer from {self.server.address} within {timeout:.0f}s"
            ) from None
        except ApiError as exc:
            if exc.status == 495:
                raise
            raise ServerUnreachable(
                f"bad answer from {self.server.address}: {exc.message}"
            ) from None
        except ssl.SSLError as exc:
            raise ServerUnreachable(
                f"TLS with {self.server.address} failed: {exc.reason or exc}"
            ) from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise ServerUnreachable(f"cannot reach {self.server.address}: {reason}") from None
        status = int(response.start[0]) if response.start[0].isdigit() else 0
        try:
            body = response.json()
        except ApiError:
            body = {}
        return status, body, conn.fingerprint

    async def _login_once(self, refused: str | None) -> None:
        """Log in, unless a concurrent call did meanwhile (the token is no longer `refused`, or
        no longer due)."""
        async with self._login_lock:
            if refused is None and not self.token_due():
                return
            if refused is not None and self.token not in (None, refused):
                return
            await self.login()

    async def login(self) -> None:
        """Prove the secret both ways and get a token; pins the server's certificate.

        Until the challenge proves the certificate, there is no pin and no token: nothing of
        value can go to whoever answered.
        """
        self.token = None
        self.pinned = None
        self.close()
        status, body, seen = await self._exchange("GET", "/login", None, None, pinned=False)
        if status != 200:
            self._raise(status, body, login=True)
        try:
            answer = auth.answer_challenge(self._key, str(body.get("challenge", "")), seen)
        except auth.AuthError as exc:
            self.close()
            raise LoginRefused(str(exc)) from None
        self.pinned = seen  # the answer goes only to the certificate that proved itself
        status, body, _ = await self._exchange(
            "POST",
            "/login",
            {"challenge_id": body.get("challenge_id"), "answer": answer, "tunnel": self.tunnel_id},
            None,
        )
        if status != 200:
            self._raise(status, body, login=True)
        self.token = str(body["token"])
        self.token_expires = time.monotonic() + float(body.get("expires_in", 0))

    def token_due(self) -> bool:
        return self.token is None or time.monotonic() > self.token_expires - RENEW_BEFORE

    async def call(
        self, method: str, path: str, payload: Any = None, timeout: float | None = None
    ) -> Any:
        """An authenticated request; ApiError for a 4xx, after one re-login if the token lapsed.

        `timeout` overrides the client's timeout for this call (e.g. a route whose certificate
        the server obtains over ACME first).
        """
        if self.token_due():
            await self._login_once(None)
        token = self.token
        status, body, _ = await self._exchange(method, path, payload, token, timeout)
        if status == 401:
            await self._login_once(token)
            status, body, _ = await self._exchange(method, path, payload, self.token, timeout)
        if not 200 <= status < 300:
            self._raise(status, body)
        return body

    @staticmethod
    def _raise(status: int, body: Any, login: bool = False) -> None:
        code = str(body.get("error", "error")) if isinstance(body, dict) else "error"
        message = str(body.get("message", "")) if isinstance(body, dict) else ""
        if login and status == 401:
            raise LoginRefused(f"the server refused the secret: {message or code}")
        if login and status == 429:
            raise LoginRefused(f"the server is refusing logins from this address: {message}")
        if status >= 500 or status == 0:
            raise ServerUnreachable(f"the server failed ({status} {code}): {message}")
        raise ApiError(status, code, message or code)
