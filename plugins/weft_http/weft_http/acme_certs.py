"""Certificates over ACME HTTP-01 (RFC 8555) with the `acme` library, kept in the state directory.

Layout under the server's state directory (folder 0700, files 0600):

    acme/account.key        the ACME account key (JWK, JSON)
    acme/account.json       {"directory": URL, "uri": account URL}
    certs/NAME.pem          certificate chain + private key for NAME
    certs/NAME.json         {"directory": URL} the CA that issued it

A stored certificate still valid for an hour or more is served at once when a tunnel (re)connects
or the server restarts (no new order, no waiting for the CA); a watcher renews every name in use
once it enters the renewal window (the last third of its lifetime, see `renewal_window`), at once
for one served while already in it, and swaps in whatever newer certificate is stored for a name
(the TLS context changes for new connections; open ones keep theirs). While the CA fails, the
stored certificate stays in service and the watcher keeps trying.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import josepy as jose
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from weft_core import record_event, write_private

from . import LETS_ENCRYPT, LETS_ENCRYPT_STAGING, vhost  # noqa: F401 (constants kept here too)
from .certs import CertificateError, CertInfo, check_pair, split_pem, utcnow

log = logging.getLogger("weft.http.acme")

# Whatever the window says, a name this manager has renewed is not ordered again within this: an
# explicit window almost as long as the lifetime would otherwise order at nearly every check.
MIN_RENEW_INTERVAL = datetime.timedelta(hours=1)
# A stored certificate still valid this long is served at once, due for renewal or not (the watcher
# renews it in the background); one about to expire is ordered anew before the route opens: it is
# not worth a tunnel that looks fine and then breaks.
MIN_VALID = datetime.timedelta(hours=1)
# Timeout of each request to the CA (connect, then each read).
NETWORK_TIMEOUT = 15
# The tunnel's POST /routes waits ROUTE_TIMEOUT (150 s, weft_core/tunnel.py) while obtain() runs;
# it must hear a certificate or a reason clearly before that, never its own timeout. An order for a
# tunnel (waiting for another order of the same name included) gets --acme-timeout capped to this,
# plus one network timeout for the request under way: 105 s by default, at most 120 s. (Before,
# --acme-timeout only bounded the polling, which began after the account set-up, the order and the
# challenge answers, up to 15 s each, and after any other name's order on a single lock.)
ORDER_LIMIT = 105.0


class AcmeFailure(Exception):
    """Why a certificate could not be obtained, in words for the tunnel's user. `fetch`: the CA
    could not fetch the challenge (wrong DNS, or port 80 closed: the server can tell which)."""

    def __init__(self, message: str, fetch: bool = False) -> None:
        super().__init__(message)
        self.fetch = fetch


FETCH_PROBLEMS = ("connection", "unauthorized", "incorrectResponse")


@attrs.frozen
class AcmeSettings:
    directory: str
    ca_bundle: str | None
    email: str | None
    renew_before: datetime.timedelta | None  # None: when a third of the lifetime is left
    check_interval: float
    timeout: float


@attrs.define
class Stored:
    chain: bytes
    key: bytes
    info: CertInfo


def _problem(exc: BaseException) -> messages.Error | None:
    """The CA's problem document behind `exc`, if it has one."""
    if isinstance(exc, errors.ValidationError):
        for authzr in exc.failed_authzrs:
            for chall in authzr.body.challenges:
                if chall.error is not None:
                    return chall.error
        return None
    if isinstance(exc, messages.Error):
        return exc
    if isinstance(exc, errors.IssuanceError):  # the order failed at finalization
        return exc.error
    return None


def _problem_code(problem: messages.Error) -> str:
    return (problem.code or problem.typ or "").rsplit(":", 1)[-1]


def failure(exc: BaseException, name: str) -> AcmeFailure:
    """`exc` as the AcmeFailure the tunnel is told about."""
    problem = _problem(exc)
    fetch = problem is not None and _problem_code(problem) in FETCH_PROBLEMS
    return AcmeFailure(explain(exc, name), fetch=fetch)


def explain(exc: BaseException, name: str) -> str:
    """A sentence saying what went wrong and what to fix."""
    problem = _problem(exc)
    if problem is not None:
        return _explain_problem(problem, name)
    if isinstance(exc, errors.ValidationError):
        return f"the CA could not validate {name}"
    if isinstance(exc, errors.TimeoutError | TimeoutError):
        return f"the CA did not finish validating {name} in time"
    if isinstance(exc, OSError | errors.ClientError):
        return f"cannot talk to the ACME directory: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _explain_problem(problem: messages.Error, name: str) -> str:
    code = _problem_code(problem)
    detail = problem.detail or ""
    if code == "dns":
        return (f"DNS for {name} does not resolve to this server ({detail}); point an A/AAAA "
                "record at this server and check with `weft probe`")
    if code in FETCH_PROBLEMS:
        return (f"the CA could not fetch the challenge from http://{name}/ on port 80 "
                f"({detail}); make sure DNS points here and port 80 is open (`weft probe {name}`)")
    if code == "rateLimited":
        return f"the CA's rate limit was hit ({detail}); wait and try again"
    if code == "rejectedIdentifier":
        return f"the CA refuses to issue for {name} ({detail})"
    return f"the CA refused ({code}): {detail}"


def renewal_window(info: CertInfo, renew_before: datetime.timedelta | None) -> datetime.timedelta:
    """How long before expiry `info` is renewed: the last third of its lifetime (what certbot and
    Caddy do: 30 days of Let's Encrypt's 90, 2 of its 6-day certificates; a fixed 30 days would
    order at every check for a CA issuing shorter ones), unless --acme-renew-before sets a window
    shorter than the lifetime."""
    lifetime = info.not_after - info.not_before
    if renew_before is None or renew_before >= lifetime:
        return lifetime / 3
    return renew_before


@attrs.define
class _Watch:
    install: Callable[[Stored], None]
    fingerprint: str  # of the certificate `install` last got


@attrs.define
class _NameLock:
    lock: threading.Lock = attrs.Factory(threading.Lock)
    users: int = 0  # orders running or waiting for this name


class AcmeManager:
    """Obtains, stores, reuses and renews certificates for the names the server serves."""

    def __init__(self, state_dir: Path, settings: AcmeSettings,
                 clock: Callable[[], datetime.datetime] = utcnow) -> None:
        self.state_dir = state_dir
        self.settings = settings
        self.clock = clock
        # One lock per name (the acme client is blocking, so orders run in threads): a reconnect
        # and the watcher do not both order a name, and one name's failing order does not hold up
        # the others. A name's entry goes once no order runs or waits for it.
        self._locks: dict[str, _NameLock] = {}
        self._locks_guard = threading.Lock()
        self._account_lock = threading.Lock()  # one account set-up, shared by all orders
        self._renewed_at: dict[str, datetime.datetime] = {}
        self._client: client.ClientV2 | None = None
        self.watched: dict[str, _Watch] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None  # a check now, not at the next interval

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
        if not isinstance(meta, dict) or meta.get("directory") != self.settings.directory:
            return None
        certs, key = split_pem(data)
        if not certs or key is None:
            return None
        chain = b"".join(certs)
        try:
            info = check_pair(chain, key, name, now=self.clock())
        except (CertificateError, ValueError):
            return None
        return Stored(chain, key, info)

    def _save(self, name: str, chain: bytes, key_pem: bytes) -> Stored:
        info = check_pair(chain, key_pem, name, now=self.clock())
        path = self._cert_path(name)
        write_private(path, chain + key_pem)
        write_private(path.with_suffix(".json"),
                      json.dumps({"directory": self.settings.directory}).encode())
        return Stored(chain, key_pem, info)

    def due(self, name: str, stored: Stored) -> bool:
        """True if `stored` (the certificate for `name`) should be renewed now."""
        now = self.clock()
        remaining = stored.info.remaining(now)
        if remaining > renewal_window(stored.info, self.settings.renew_before):
            return False
        renewed = self._renewed_at.get(name)
        return renewed is None or now - renewed >= MIN_RENEW_INTERVAL or remaining < MIN_VALID

    def _renewed(self, name: str) -> None:
        now = self.clock()
        with self._locks_guard:  # orders of other names run in other threads
            # Bounded: entries older than the interval no longer matter.
            for old in [n for n, at in self._renewed_at.items()
                        if now - at >= MIN_RENEW_INTERVAL]:
                del self._renewed_at[old]
            self._renewed_at[name] = now

    # --- ordering --------------------------------------------------------------------------

    def _account(self) -> client.ClientV2:
        with self._account_lock:
            return self._client or self._new_account()

    def _new_account(self) -> client.ClientV2:
        key_path = self.state_dir / "acme" / "account.key"
        try:
            jwk = jose.JWK.json_loads(key_path.read_text())
        except FileNotFoundError:
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = jose.JWKRSA(key=private)
            write_private(key_path, jwk.json_dumps().encode())
        net = self._network(jwk)
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

    def ordering(self) -> set[str]:
        """Names with an order running or waiting."""
        with self._locks_guard:
            return set(self._locks)

    def waiting(self, name: str) -> int:
        """How many orders for `name` run or wait (at most one runs)."""
        with self._locks_guard:
            entry = self._locks.get(name)
            return entry.users if entry is not None else 0

    @contextlib.contextmanager
    def _name_lock(self, name: str, wait: float | None) -> Iterator[bool]:
        """Hold `name`'s lock (yields False if it was not free within `wait` seconds)."""
        with self._locks_guard:
            entry = self._locks.setdefault(name, _NameLock())
            entry.users += 1
        try:
            acquired = entry.lock.acquire(timeout=-1 if wait is None else max(0.0, wait))
            try:
                yield acquired
            finally:
                if acquired:
                    entry.lock.release()
        finally:
            with self._locks_guard:
                entry.users -= 1
                if entry.users == 0:
                    del self._locks[name]

    def order(self, name: str, deadline: float | None = None) -> Stored:
        """A certificate for `name` not due for renewal: a new HTTP-01 order, stored (blocking:
        call in a thread), unless another order for `name` got one meanwhile. `deadline`
        (time.monotonic()) bounds the wait for that other order and this one's polling;
        without it the order gets --acme-timeout from when it starts."""
        wait = None if deadline is None else deadline - time.monotonic()
        with self._name_lock(name, wait) as acquired:
            if not acquired:
                raise AcmeFailure(f"an earlier order for {name} is still running; try again "
                                  "in a minute")
            # Checked again under the lock: a reconnect and the watcher may both have found the
            # certificate due, and the one that waited must not order a second time.
            stored = self.stored(name)
            if stored is not None and not self.due(name, stored):
                return stored
            if deadline is None:
                deadline = time.monotonic() + self.settings.timeout
            try:
                fresh = self._order(name, deadline)
            except AcmeFailure:
                raise
            except Exception as exc:
                if isinstance(exc, OSError | errors.ClientError):
                    self._client = None  # set up the account again next time
                raise failure(exc, name) from exc
            self._renewed(name)
            return fresh

    def _order_client(self) -> client.ClientV2:
        """A client of its own for one order (the account's key and URL, a fresh connection):
        orders of different names run side by side in threads, and a shared client's nonce pool
        and HTTP session are not thread-safe (two threads could pop the same nonce)."""
        shared = self._account()
        return client.ClientV2(shared.directory, self._network(shared.net.key, shared.net.account))

    def _network(self, key: jose.JWK | None,
                 account: messages.RegistrationResource | None = None) -> client.ClientNetwork:
        """An HTTP connection to the CA, signing with `key` (as `account` once there is one)."""
        verify: bool | str = self.settings.ca_bundle or True  # a CA bundle's path works too
        return client.ClientNetwork(key, account=account, user_agent="weft-http",
                                    timeout=NETWORK_TIMEOUT, verify_ssl=verify)  # type: ignore[arg-type]

    def _order(self, name: str, deadline: float) -> Stored:
        acme = self._order_client()
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        csr = crypto_util.make_csr(key_pem, [name])
        order = acme.new_order(csr)
        log.info("ACME: order for %s placed", name)
        tokens: list[str] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # a recent validation the CA reuses: answering again is refused
                chall = next((c for c in authz.body.challenges
                              if isinstance(c.chall, challenges.HTTP01)), None)
                if chall is None:
                    raise AcmeFailure(f"the CA offers no HTTP-01 challenge for {name}")
                response, validation = chall.response_and_validation(acme.net.key)
                token = chall.chall.encode("token")
                vhost.CHALLENGES[token] = validation
                tokens.append(token)
                acme.answer_challenge(chall, response)
            # acme polls against a naive local datetime; the set-up above used up part of it.
            poll_until = datetime.datetime.now() + datetime.timedelta(
                seconds=max(0.0, deadline - time.monotonic()))
            finished = acme.poll_and_finalize(order, poll_until)
        finally:
            for token in tokens:
                vhost.CHALLENGES.pop(token, None)
        fresh = self._save(name, finished.fullchain_pem.encode(), key_pem)
        log.info("ACME: certificate for %s issued (serial %x, valid until %s)",
                 name, fresh.info.serial, fresh.info.not_after)
        return fresh

    def answer_within(self) -> float:
        """Longest obtain() takes to answer a tunnel: see ORDER_LIMIT."""
        return min(self.settings.timeout, ORDER_LIMIT) + NETWORK_TIMEOUT

    async def obtain(self, name: str) -> tuple[Stored, bool]:
        """A usable certificate for `name`: (stored one, False) or (newly ordered, True).

        A stored certificate valid for at least MIN_VALID is served at once, also when it is due
        for renewal: the watcher renews it in the background (started by `watch`). A restart or
        reconnect therefore never waits for the CA, nor loses a working site to a CA outage.
        Only a name without a usable certificate waits for an order."""
        stored = self.stored(name)
        if stored is not None and stored.info.remaining(self.clock()) >= MIN_VALID:
            due = self.due(name, stored)
            log.info("ACME: reusing the stored certificate for %s (serial %x, valid until %s)%s",
                     name, stored.info.serial, stored.info.not_after,
                     "; due for renewal, renewing it in the background" if due else "")
            record_event("certificate", event="loaded", name=name)
            return stored, False
        deadline = time.monotonic() + min(self.settings.timeout, ORDER_LIMIT)
        try:
            # The thread cannot be stopped: past the limit it finishes (and stores) on its own,
            # and the watcher installs what it stored.
            async with asyncio.timeout(self.answer_within()):
                fresh = await asyncio.to_thread(self.order, name, deadline)
        except TimeoutError:
            record_event("certificate", event="failed", name=name)
            raise AcmeFailure(f"the CA did not finish validating {name} in time") from None
        except AcmeFailure:
            record_event("certificate", event="failed", name=name)
            raise
        record_event("certificate", event="issued", name=name)
        return fresh, True

    # --- renewal ---------------------------------------------------------------------------

    def watch(self, name: str, install: Callable[[Stored], None],
              installed: Stored) -> Callable[[], None]:
        """Keep `name`'s certificate fresh: renew it when due and hand `install` every newer
        certificate stored for it (`installed` is the one it has now); returns unwatch."""
        entry = self.watched[name] = _Watch(install, installed.info.fingerprint)
        loop = asyncio.get_running_loop()
        # Managers are shared per state directory and settings; a task and an Event belong to
        # one loop: a watcher of another (or a closed) loop is replaced, with its Event.
        if self._watcher is None or self._watcher.done() or self._watcher.get_loop() is not loop:
            if self._watcher is not None and not self._watcher.done() and \
                    not self._watcher.get_loop().is_closed():
                self._watcher.cancel()
            self._wake = asyncio.Event()
            self._watcher = loop.create_task(self._watch_loop(self._wake))
        assert self._wake is not None
        if self.due(name, installed):
            self._wake.set()  # served while due (obtain): renew now, not in an hour

        def unwatch() -> None:
            if self.watched.get(name) is entry:
                del self.watched[name]
        return unwatch

    async def _watch_loop(self, wake: asyncio.Event) -> None:
        while self.watched:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.settings.check_interval)
            wake.clear()
            for name, entry in list(self.watched.items()):
                try:
                    await self._check(name, entry)
                except Exception:  # one name's trouble must not end renewal for every name
                    log.exception("ACME: checking the certificate for %s failed; retrying at "
                                  "the next check", name)

    async def _check(self, name: str, entry: _Watch) -> None:
        """Renew `name` if due; install what is stored if it is not what `entry` has. (An order
        that outlived the tunnel's wait, or another route's renewal, may have stored a newer one:
        comparing fingerprints, not "did I just order", is what gets it served.)"""
        stored = self.stored(name)
        if stored is None or self.due(name, stored):
            log.info("ACME: renewing the certificate for %s", name)
            try:
                stored = await asyncio.to_thread(self.order, name)
            except AcmeFailure as exc:
                log.warning("ACME: renewing %s failed (will retry): %s", name, exc)
                record_event("certificate", event="failed", name=name)
                return
        if stored.info.fingerprint == entry.fingerprint or self.watched.get(name) is not entry:
            return
        entry.install(stored)
        entry.fingerprint = stored.info.fingerprint
        record_event("certificate", event="renewed", name=name)
        log.info("ACME: certificate for %s renewed (serial %x)", name, stored.info.serial)

    def stop(self) -> None:
        if self._watcher is not None:
            if not self._watcher.get_loop().is_closed():
                self._watcher.cancel()
            self._watcher = None
        self._wake = None


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
