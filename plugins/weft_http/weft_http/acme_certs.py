"""Certificates over ACME HTTP-01 (RFC 8555) with the `acme` library, kept in the state directory.

Layout under the server's state directory (folder 0700, files 0600):

    acme/account.key        the ACME account key (JWK, JSON)
    acme/account.json       {"directory": URL, "uri": account URL}
    certs/NAME.pem          certificate chain + private key for NAME
    certs/NAME.json         {"directory": URL} the CA that issued it

A stored certificate is reused after a restart (no new order) while it is outside the renewal
window; a watcher renews every managed name that enters the window, swapping the TLS context for
new connections while open connections keep the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import josepy as jose
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from weft_core import record_event, write_private

from . import LETS_ENCRYPT, LETS_ENCRYPT_STAGING, vhost  # noqa: F401 (constants kept here too)
from .certs import CertificateError, CertInfo, check_pair, split_pem

log = logging.getLogger("weft.http.acme")


class AcmeFailure(Exception):
    """Why a certificate could not be obtained, in words for the tunnel's user."""


@attrs.frozen
class AcmeSettings:
    directory: str
    ca_bundle: str | None
    email: str | None
    renew_before: datetime.timedelta
    check_interval: float
    timeout: float


@attrs.define
class Stored:
    chain: bytes
    key: bytes
    info: CertInfo


def explain(exc: BaseException, name: str) -> str:
    """A sentence saying what went wrong and what to fix."""
    if isinstance(exc, errors.ValidationError):
        for authzr in exc.failed_authzrs:
            for chall in authzr.body.challenges:
                if chall.error is not None:
                    return _explain_problem(chall.error, name)
        return f"the CA could not validate {name}"
    if isinstance(exc, messages.Error):
        return _explain_problem(exc, name)
    if isinstance(exc, errors.TimeoutError | TimeoutError):
        return f"the CA did not finish validating {name} in time"
    if isinstance(exc, OSError | errors.ClientError):
        return f"cannot talk to the ACME directory: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _explain_problem(problem: messages.Error, name: str) -> str:
    code = (problem.code or problem.typ or "").rsplit(":", 1)[-1]
    detail = problem.detail or ""
    if code == "dns":
        return (f"DNS for {name} does not resolve to this server ({detail}); point an A/AAAA "
                "record at this server and check with `weft probe`")
    if code in ("connection", "unauthorized", "incorrectResponse"):
        return (f"the CA could not fetch the challenge from http://{name}/ on port 80 "
                f"({detail}); make sure DNS points here and port 80 is open (`weft probe {name}`)")
    if code == "rateLimited":
        return f"the CA's rate limit was hit ({detail}); wait and try again"
    if code == "rejectedIdentifier":
        return f"the CA refuses to issue for {name} ({detail})"
    return f"the CA refused ({code}): {detail}"


class AcmeManager:
    """Obtains, stores, reuses and renews certificates for the names the server serves."""

    def __init__(self, state_dir: Path, settings: AcmeSettings) -> None:
        self.state_dir = state_dir
        self.settings = settings
        self._lock = threading.Lock()  # one order at a time (the acme client is blocking)
        self._client: client.ClientV2 | None = None
        self.watched: dict[str, Callable[[Stored], None]] = {}
        self._watcher: asyncio.Task[None] | None = None

    # --- storage ---------------------------------------------------------------------------

    def _cert_path(self, name: str) -> Path:
        return self.state_dir / "certs" / f"{name}.pem"

    def stored(self, name: str) -> Stored | None:
        """The stored certificate for `name` if it came from this CA and is still usable."""
        path = self._cert_path(name)
        try:
            data = path.read_bytes()
            meta = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("directory") != self.settings.directory:
            return None
        certs, key = split_pem(data)
        if not certs or key is None:
            return None
        chain = b"".join(certs)
        try:
            info = check_pair(chain, key, name)
        except (CertificateError, ValueError):
            return None
        return Stored(chain, key, info)

    def due(self, stored: Stored) -> bool:
        return stored.info.remaining() <= self.settings.renew_before

    # --- ordering --------------------------------------------------------------------------

    def _account(self) -> client.ClientV2:
        if self._client is not None:
            return self._client
        key_path = self.state_dir / "acme" / "account.key"
        try:
            jwk = jose.JWK.json_loads(key_path.read_text())
        except FileNotFoundError:
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = jose.JWKRSA(key=private)
            write_private(key_path, jwk.json_dumps().encode())
        verify: bool | str = self.settings.ca_bundle or True
        net = client.ClientNetwork(jwk, user_agent="weft-http", timeout=15,
                                   verify_ssl=verify)  # type: ignore[arg-type]  # a path works
        directory = client.ClientV2.get_directory(self.settings.directory, net)
        acme = client.ClientV2(directory, net)
        account_path = self.state_dir / "acme" / "account.json"
        try:
            meta = json.loads(account_path.read_text())
        except (OSError, ValueError):
            meta = {}
        registration = messages.NewRegistration.from_data(
            email=self.settings.email, terms_of_service_agreed=True)
        if meta.get("directory") == self.settings.directory and meta.get("uri"):
            try:
                acme.query_registration(messages.RegistrationResource(
                    uri=meta["uri"], body=messages.Registration()))
                log.info("ACME: using the stored account %s", meta["uri"])
            except (messages.Error, KeyError):
                meta = {}
        if not meta.get("uri") or meta.get("directory") != self.settings.directory:
            try:
                regr = acme.new_account(registration)
            except errors.ConflictError as exc:  # the key is known already: look it up
                regr = acme.query_registration(messages.RegistrationResource(
                    uri=str(exc.location), body=messages.Registration()))
            write_private(account_path, json.dumps(
                {"directory": self.settings.directory, "uri": regr.uri}).encode())
            log.info("ACME: account registered at %s", self.settings.directory)
        self._client = acme
        return acme

    def order(self, name: str) -> Stored:
        """Run one HTTP-01 order for `name` (blocking: call in a thread) and store the result."""
        with self._lock:
            try:
                return self._order(name)
            except AcmeFailure:
                raise
            except Exception as exc:
                self._client = None if isinstance(exc, OSError | errors.ClientError) \
                    else self._client
                raise AcmeFailure(explain(exc, name)) from exc

    def _order(self, name: str) -> Stored:
        acme = self._account()
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        csr = crypto_util.make_csr(key_pem, [name])
        order = acme.new_order(csr)
        log.info("ACME: order for %s placed", name)
        tokens: list[str] = []
        try:
            for authz in order.authorizations:
                chall = next((c for c in authz.body.challenges
                              if isinstance(c.chall, challenges.HTTP01)), None)
                if chall is None:
                    raise AcmeFailure(f"the CA offers no HTTP-01 challenge for {name}")
                response, validation = chall.response_and_validation(acme.net.key)
                token = chall.chall.encode("token")
                vhost.CHALLENGES[token] = validation
                tokens.append(token)
                acme.answer_challenge(chall, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=self.settings.timeout)
            finished = acme.poll_and_finalize(order, deadline)
        finally:
            for token in tokens:
                vhost.CHALLENGES.pop(token, None)
        chain = finished.fullchain_pem.encode()
        info = check_pair(chain, key_pem, name)
        path = self._cert_path(name)
        write_private(path, chain + key_pem)
        write_private(path.with_suffix(".json"),
                       json.dumps({"directory": self.settings.directory}).encode())
        log.info("ACME: certificate for %s issued (serial %x, valid until %s)",
                 name, info.serial, info.not_after)
        return Stored(chain, key_pem, info)

    async def obtain(self, name: str) -> tuple[Stored, bool]:
        """A usable certificate for `name`: (stored one, False) or (newly ordered, True)."""
        stored = self.stored(name)
        if stored is not None and not self.due(stored):
            log.info("ACME: reusing the stored certificate for %s (serial %x, valid until %s)",
                     name, stored.info.serial, stored.info.not_after)
            record_event("certificate", event="loaded", name=name)
            return stored, False
        try:
            fresh = await asyncio.to_thread(self.order, name)
        except AcmeFailure:
            record_event("certificate", event="failed", name=name)
            raise
        record_event("certificate", event="issued", name=name)
        return fresh, True

    # --- renewal ---------------------------------------------------------------------------

    def watch(self, name: str, install: Callable[[Stored], None]) -> Callable[[], None]:
        """Renew `name` when due and hand the new certificate to `install`; returns unwatch."""
        self.watched[name] = install
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_loop())

        def unwatch() -> None:
            if self.watched.get(name) is install:
                del self.watched[name]
        return unwatch

    async def _watch_loop(self) -> None:
        while self.watched:
            await asyncio.sleep(self.settings.check_interval)
            for name, install in list(self.watched.items()):
                stored = self.stored(name)
                if stored is not None and not self.due(stored):
                    continue
                log.info("ACME: renewing the certificate for %s", name)
                try:
                    fresh = await asyncio.to_thread(self.order, name)
                except AcmeFailure as exc:
                    log.warning("ACME: renewing %s failed (will retry): %s", name, exc)
                    record_event("certificate", event="failed", name=name)
                    continue
                if self.watched.get(name) is install:
                    install(fresh)
                    record_event("certificate", event="renewed", name=name)
                    log.info("ACME: certificate for %s renewed (serial %x)", name,
                             fresh.info.serial)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None


_MANAGERS: dict[tuple[str, Any], AcmeManager] = {}


def manager_for(state_dir: Path, settings: AcmeSettings) -> AcmeManager:
    key = (str(state_dir), settings)
    found = _MANAGERS.get(key)
    if found is None:
        found = _MANAGERS[key] = AcmeManager(state_dir, settings)
    return found


def stop_all() -> None:
    for manager in _MANAGERS.values():
        with contextlib.suppress(Exception):
            manager.stop()
