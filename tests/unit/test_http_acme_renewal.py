"""ACME certificates without a CA: reuse, renewal window, per-name orders, deadlines, reasons.

The CA is the one thing faked here: `FakeCA._order` (the part of AcmeManager that talks to the
CA) issues a self-signed certificate itself, or fails or blocks as a test asks. Storage, the
renewal rule, locking, deadlines and `explain()` are the real code.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import josepy as jose
import pytest
from acme import challenges, client, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from weft_core.tunnel import ROUTE_TIMEOUT
from weft_http import acme_certs
from weft_http.acme_certs import AcmeFailure, AcmeManager, AcmeSettings, Stored, explain

NAME = "app.example.test"
DIRECTORY = "https://ca.example.test/dir"
DAY = datetime.timedelta(days=1)
HOUR = datetime.timedelta(hours=1)
WAIT = 10.0  # seconds: the deadline for conditions that should hold at once


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def settings(**changes: object) -> AcmeSettings:
    base = AcmeSettings(directory=DIRECTORY, ca_bundle=None, email=None,
                        renew_before=datetime.timedelta(days=30), check_interval=3600.0,
                        timeout=90.0)
    return attrs.evolve(base, **changes)


def store_cert(state_dir: Path, name: str, not_before: datetime.datetime,
               not_after: datetime.datetime) -> None:
    """Write a certificate for `name` where AcmeManager keeps the ones it ordered."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    certs = state_dir / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    (certs / f"{name}.pem").write_bytes(pem)
    (certs / f"{name}.json").write_text(json.dumps({"directory": DIRECTORY}))


class FakeCA(AcmeManager):
    """AcmeManager with the CA faked: `_order` issues a certificate of `lifetime` from now,
    raises AcmeFailure(fail[name]) or first blocks until gates[name] is set."""

    def __init__(self, state_dir: Path, acme_settings: AcmeSettings,
                 lifetime: datetime.timedelta = 90 * DAY) -> None:
        super().__init__(state_dir, acme_settings)
        self.lifetime = lifetime
        self.orders: list[str] = []
        self.fail: dict[str, str] = {}
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}

    def hold(self, name: str) -> threading.Event:
        """Make orders for `name` block until the returned event is set."""
        self.started[name] = threading.Event()
        gate = self.gates[name] = threading.Event()
        return gate

    def _order(self, name: str, deadline: float | None = None) -> Stored:
        self.orders.append(name)
        if name in self.started:
            self.started[name].set()
            assert self.gates[name].wait(60), "the test never released the order"
        if name in self.fail:
            raise AcmeFailure(self.fail[name])
        now = utcnow()
        store_cert(self.state_dir, name, now - datetime.timedelta(minutes=1), now + self.lifetime)
        stored = self.stored(name)
        assert stored is not None
        return stored


def in_thread(target: object, *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


# --- 1. a restart inside the window while the CA fails keeps serving the stored certificate ---


def watched(ca: FakeCA, stored: Stored, until: Callable[[list[Stored]], bool]) -> list[Stored]:
    """What the watcher hands `install` for NAME (served `stored`) until `until(installed)`."""
    installed: list[Stored] = []

    async def main() -> None:
        unwatch = ca.watch(NAME, installed.append, stored)
        try:
            async with asyncio.timeout(WAIT):
                while not until(installed):
                    await asyncio.sleep(0.01)
        finally:
            unwatch()
            ca.stop()

    asyncio.run(main())
    return installed


def test_a_restart_inside_the_window_serves_the_stored_certificate_and_renews_it_behind(
        tmp_path: Path) -> None:
    now = utcnow()
    store_cert(tmp_path, NAME, now - 80 * DAY, now + 10 * DAY)  # inside the 30-day window
    ca = FakeCA(tmp_path, settings())  # checks hourly: the renewal must not wait for that
    stored, new = asyncio.run(ca.obtain(NAME))
    assert not new and ca.orders == []  # served at once, without waiting for the CA
    assert stored.info.not_after == (now + 10 * DAY).replace(microsecond=0)
    installed = watched(ca, stored, lambda installed: bool(installed))
    assert ca.orders == [NAME] and installed[0].info.remaining() > 80 * DAY


def test_while_the_ca_fails_the_stored_certificate_stays_and_the_failure_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = utcnow()
    store_cert(tmp_path, NAME, now - 80 * DAY, now + 10 * DAY)
    ca = FakeCA(tmp_path, settings())
    ca.fail[NAME] = "the CA's rate limit was hit (too many certificates); wait and try again"
    stored, new = asyncio.run(ca.obtain(NAME))
    assert not new and ca.orders == []
    with caplog.at_level(logging.WARNING, logger="weft.http.acme"):
        installed = watched(ca, stored, lambda installed: bool(ca.orders) and any(
            "rate limit" in r.getMessage() for r in caplog.records))
    assert installed == []  # nothing replaced the certificate being served


def test_the_watcher_installs_a_certificate_another_order_stored(tmp_path: Path) -> None:
    """An order that outlived the tunnel's wait stores its certificate later: it is served."""
    now = utcnow()
    store_cert(tmp_path, NAME, now - DAY, now + 89 * DAY)
    ca = FakeCA(tmp_path, settings(check_interval=0.05))
    first = ca.stored(NAME)
    assert first is not None
    store_cert(tmp_path, NAME, now, now + 90 * DAY)  # the late order's certificate
    installed = watched(ca, first, lambda installed: bool(installed))
    assert ca.orders == []  # nothing was due: it only installed what was stored
    assert installed[0].info.fingerprint != first.info.fingerprint


def test_failing_order_refuses_when_the_stored_certificate_is_about_to_expire(
        tmp_path: Path) -> None:
    now = utcnow()
    store_cert(tmp_path, NAME, now - 90 * DAY, now + datetime.timedelta(minutes=30))
    ca = FakeCA(tmp_path, settings())
    ca.fail[NAME] = "DNS for app.example.test does not resolve to this server"
    with pytest.raises(AcmeFailure, match="DNS"):
        asyncio.run(ca.obtain(NAME))


def test_order_rechecks_the_stored_certificate_after_taking_the_lock(tmp_path: Path) -> None:
    """The second of two callers that both found the certificate due (a reconnect and the
    watcher) gets the lock after the first stored a fresh one: it must not order again."""
    now = utcnow()
    store_cert(tmp_path, NAME, now - 90 * DAY, now + datetime.timedelta(minutes=30))  # too old
    ca = FakeCA(tmp_path, settings())  # to serve: the reconnect must order (and so wait)
    gate = ca.hold(NAME)
    watcher = in_thread(ca.order, NAME)
    assert ca.started[NAME].wait(WAIT)
    second: list[tuple[Stored, bool]] = []

    async def reconnect() -> None:
        second.append(await ca.obtain(NAME))

    reconnecting = in_thread(asyncio.run, reconnect())
    deadline = time.monotonic() + WAIT
    while ca.waiting(NAME) < 2:  # the reconnect is queued behind the watcher's order
        assert time.monotonic() < deadline, "the reconnect never queued for the lock"
        time.sleep(0.01)
    gate.set()
    watcher.join(WAIT)
    reconnecting.join(WAIT)
    assert ca.orders == [NAME]
    assert second and second[0][0].info.remaining() > 80 * DAY


# --- 2. orders of different names run side by side, and obtain answers in time --------------


def test_a_slow_order_does_not_hold_up_another_name(tmp_path: Path) -> None:
    ca = FakeCA(tmp_path, settings())
    gate = ca.hold("slow.example.test")
    slow = in_thread(ca.order, "slow.example.test")
    assert ca.started["slow.example.test"].wait(WAIT)
    try:
        fast = in_thread(ca.order, "fast.example.test")
        fast.join(WAIT)
        assert not fast.is_alive(), "the order for another name waited for the slow one"
        assert ca.stored("fast.example.test") is not None
    finally:
        gate.set()
        slow.join(WAIT)
    assert ca.waiting("slow.example.test") == 0
    assert not ca.ordering()  # a name's lock goes once no order runs or waits for it


def test_obtain_answers_in_time_while_another_order_for_the_name_hangs(tmp_path: Path) -> None:
    ca = FakeCA(tmp_path, settings(timeout=0.3))
    gate = ca.hold(NAME)
    watcher = in_thread(ca.order, NAME)
    assert ca.started[NAME].wait(WAIT)
    try:
        started = time.monotonic()
        with pytest.raises(AcmeFailure, match=NAME):
            asyncio.run(asyncio.wait_for(ca.obtain(NAME), WAIT))
        assert time.monotonic() - started < WAIT
    finally:
        gate.set()
        watcher.join(WAIT)


def test_obtain_waits_clearly_less_than_the_tunnel() -> None:
    for timeout in (30.0, 90.0, 1000.0):
        limit = AcmeManager(Path("/nonexistent"), settings(timeout=timeout)).answer_within()
        assert limit >= min(timeout, 90.0)  # the CA gets the time --acme-timeout gives it
        assert limit <= ROUTE_TIMEOUT - 20  # and the tunnel hears a reason, not its timeout


# --- 3. the renewal window follows the certificate's lifetime -------------------------------


def test_short_lived_certificate_is_not_renewed_at_every_check(tmp_path: Path) -> None:
    now = utcnow()
    store_cert(tmp_path, NAME, now - DAY, now + 5 * DAY)  # a 6-day certificate, 5 days left
    ca = FakeCA(tmp_path, settings(renew_before=None), lifetime=6 * DAY)
    stored, new = asyncio.run(ca.obtain(NAME))
    assert not new and ca.orders == [] and not ca.due(NAME, stored)
    store_cert(tmp_path, NAME, now - 4 * DAY - HOUR, now + 2 * DAY - HOUR)  # under a third left
    stored, new = asyncio.run(ca.obtain(NAME))
    assert ca.due(NAME, stored)
    assert ca.order(NAME).info.remaining() > 5 * DAY and ca.orders == [NAME]


@pytest.mark.parametrize(("lifetime", "renew_before", "window"), [
    (90 * DAY, None, 30 * DAY),
    (45 * DAY, None, 15 * DAY),
    (6 * DAY, None, 2 * DAY),
    (45 * DAY, 30 * DAY, 30 * DAY),  # set explicitly: kept when shorter than the lifetime
    (90 * DAY, 10 * DAY, 10 * DAY),  # set explicitly: later than a third
    (90 * DAY, 60 * DAY, 60 * DAY),  # or earlier
    (6 * DAY, 7 * DAY, 2 * DAY),  # longer than the lifetime: ignored
])
def test_renewal_window(lifetime: datetime.timedelta, renew_before: datetime.timedelta | None,
                        window: datetime.timedelta) -> None:
    start = utcnow()
    info = acme_certs.CertInfo(names=(NAME,), not_before=start, not_after=start + lifetime,
                               serial=1, fingerprint="")
    assert acme_certs.renewal_window(info, renew_before) == window


def test_a_renewed_name_is_not_ordered_again_within_the_minimum_interval(
        tmp_path: Path) -> None:
    """A window set almost as long as the lifetime would make every check order again."""
    clock = [utcnow()]
    ca = FakeCA(tmp_path, settings(renew_before=90 * DAY - datetime.timedelta(minutes=5)))
    ca.clock = lambda: clock[0]
    fresh = ca.order(NAME)
    clock[0] += datetime.timedelta(minutes=30)
    assert fresh.info.remaining(clock[0]) < ca.settings.renew_before  # inside the window
    assert not ca.due(NAME, fresh)
    clock[0] += acme_certs.MIN_RENEW_INTERVAL
    assert ca.due(NAME, fresh)


# --- explain(): the reason the tunnel is told ---------------------------------------------------


def failed_validation(code: str, detail: str) -> errors.ValidationError:
    """What poll_and_finalize raises when the CA's validation of the challenge failed."""
    problem = messages.Error.with_code(code, detail=detail)
    challenge = messages.ChallengeBody(
        chall=challenges.HTTP01(token=b"t" * 32), status=messages.STATUS_INVALID, error=problem)
    authz = messages.Authorization(
        identifier=messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=NAME),
        challenges=[challenge], status=messages.STATUS_INVALID)
    return errors.ValidationError([messages.AuthorizationResource(
        body=authz, uri="https://ca.example.test/authz/1")])


def test_explain_dns_not_pointing_here() -> None:
    reason = explain(failed_validation("dns", f"no valid A records found for {NAME}"), NAME)
    assert reason.startswith(f"DNS for {NAME} does not resolve to this server")
    assert "no valid A records" in reason and "weft probe" in reason


@pytest.mark.parametrize("code", ["connection", "unauthorized", "incorrectResponse"])
def test_explain_port_80_unreachable(code: str) -> None:
    reason = explain(failed_validation(code, "198.51.100.1: Connection refused"), NAME)
    assert f"http://{NAME}/ on port 80" in reason and "Connection refused" in reason
    assert "port 80 is open" in reason


def test_only_a_failed_fetch_asks_the_server_to_check_dns() -> None:
    assert acme_certs.failure(failed_validation("connection", "timeout"), NAME).fetch
    assert not acme_certs.failure(failed_validation("dns", "NXDOMAIN"), NAME).fetch
    assert not acme_certs.failure(messages.Error.with_code("rateLimited", detail="5"), NAME).fetch
    assert not acme_certs.failure(errors.TimeoutError(), NAME).fetch


def test_explain_rate_limit() -> None:
    # new_order raises the CA's problem document itself (HTTP 429).
    problem = messages.Error.with_code(
        "rateLimited", detail="too many certificates (5) already issued for this exact set")
    reason = explain(problem, NAME)
    assert reason.startswith("the CA's rate limit was hit (too many certificates")
    assert "wait and try again" in reason


def test_explain_other_problems() -> None:
    refused = explain(messages.Error.with_code("rejectedIdentifier", detail="forbidden"), NAME)
    assert refused == f"the CA refuses to issue for {NAME} (forbidden)"
    other = explain(messages.Error.with_code("serverInternal", detail="boom"), NAME)
    assert other == "the CA refused (serverInternal): boom"
    finalize = errors.IssuanceError(messages.Error.with_code("badCSR", detail="bad key"))
    assert explain(finalize, NAME) == "the CA refused (badCSR): bad key"
    timed_out = explain(errors.TimeoutError(), NAME)
    assert timed_out == f"the CA did not finish validating {NAME} in time"
    assert explain(ConnectionRefusedError(111, "refused"), NAME).startswith(
        "cannot talk to the ACME directory")


# --- a reused (already valid) authorization is not answered again ------------------------------


class FakeAcmeClient:
    """The CA's side of acme.client.ClientV2 (faked: no CA runs here) for one order whose
    authorizations have the given statuses; the certificate is self-signed for the CSR's key."""

    def __init__(self, statuses: list[str]) -> None:
        self.net = type("Net", (), {"key": jose.JWKRSA(key=rsa.generate_private_key(
            public_exponent=65537, key_size=2048))})()
        self.statuses = statuses
        self.answered: list[bytes] = []
        self.csr_pem = b""

    def new_order(self, csr_pem: bytes) -> messages.OrderResource:
        self.csr_pem = csr_pem
        authzs = [messages.AuthorizationResource(uri=f"https://ca.example.test/authz/{i}",
                                                 body=messages.Authorization(
            identifier=messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=NAME),
            status=messages.Status.from_json(status),
            challenges=[messages.ChallengeBody(
                chall=challenges.HTTP01(token=bytes([i]) * 32),
                status=messages.Status.from_json(status))]))
            for i, status in enumerate(self.statuses)]
        return messages.OrderResource(uri="https://ca.example.test/order/1",
                                      authorizations=authzs, csr_pem=csr_pem)

    def answer_challenge(self, challb: messages.ChallengeBody, response: object) -> None:
        if challb.status != messages.STATUS_PENDING:  # what Pebble and Boulder answer
            raise messages.Error.with_code(
                "malformed", detail="Cannot update challenge with status valid, only pending")
        self.answered.append(challb.chall.token)

    def poll_and_finalize(self, order: messages.OrderResource,
                          deadline: datetime.datetime) -> messages.OrderResource:
        csr = x509.load_pem_x509_csr(order.csr_pem)
        signer = ec.generate_private_key(ec.SECP256R1())
        now = utcnow()
        cert = (x509.CertificateBuilder().subject_name(csr.subject)
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake CA")]))
                .public_key(csr.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + 90 * DAY)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
                .sign(signer, hashes.SHA256()))
        return order.update(fullchain_pem=cert.public_bytes(serialization.Encoding.PEM).decode())


def test_a_reused_valid_authorization_is_not_answered_again(tmp_path: Path) -> None:
    """CAs reuse a name's recent valid authorization in a new order (Pebble half the time);
    answering its challenge again is refused, which failed renewals."""
    manager = AcmeManager(tmp_path, settings())
    fake = FakeAcmeClient(["valid", "pending"])
    manager._order_client = lambda: fake  # type: ignore[assignment,method-assign,return-value]
    stored = manager.order(NAME)
    assert fake.answered == [b"\x01" * 32]
    assert stored.info.remaining() > 89 * DAY
    assert manager.stored(NAME) is not None


def test_the_ca_options_pick_the_directory_and_refuse_both_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from weft_core.cli import build_parser
    from weft_core.plugins import load_plugins
    from weft_http import LETS_ENCRYPT, LETS_ENCRYPT_STAGING, acme_settings

    parser, _ = build_parser(load_plugins())
    server = ["server", "--bind", "198.51.100.1"]
    assert acme_settings(parser.parse_args(server)).directory == LETS_ENCRYPT
    assert acme_settings(parser.parse_args([*server, "--acme-staging"])).directory == \
        LETS_ENCRYPT_STAGING
    own = acme_settings(parser.parse_args([*server, "--acme-directory", "https://ca.test/dir",
                                           "--email", "ops@example.test"]))
    assert (own.directory, own.email) == ("https://ca.test/dir", "ops@example.test")
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([*server, "--acme-staging", "--acme-directory", "https://ca.test/d"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_each_order_gets_a_client_of_its_own_on_the_shared_account(tmp_path: Path) -> None:
    """Orders of different names run side by side in threads; one client's nonce pool and HTTP
    session are not thread-safe (two threads could pop the same nonce: a KeyError for a reason)."""
    manager = AcmeManager(tmp_path, settings())
    key = jose.JWKRSA(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    account = messages.RegistrationResource(uri="https://ca.example.test/acct/1",
                                            body=messages.Registration())
    directory = messages.Directory({"newOrder": "https://ca.example.test/new-order"})
    manager._client = client.ClientV2(directory, client.ClientNetwork(key, account=account))
    one, two = manager._order_client(), manager._order_client()
    assert one.net is not two.net and one.net.session is not two.net.session
    assert one.net.key is key and two.net.account is account
    assert one.directory is directory


def test_one_names_failing_install_does_not_end_renewal_for_the_others(tmp_path: Path) -> None:
    now = utcnow()
    for name in ("a.example.test", "b.example.test"):
        store_cert(tmp_path, name, now - 80 * DAY, now + 10 * DAY)  # both due
    ca = FakeCA(tmp_path, settings(check_interval=0.05))
    installed: list[str] = []

    def broken(fresh: Stored) -> None:
        raise OSError(28, "No space left on device")

    async def main() -> None:
        for name, install in (("a.example.test", broken),
                              ("b.example.test", lambda fresh: installed.append("b"))):
            stored = ca.stored(name)
            assert stored is not None
            ca.watch(name, install, stored)
        try:
            async with asyncio.timeout(WAIT):
                while not installed:
                    await asyncio.sleep(0.01)
        finally:
            ca.stop()

    asyncio.run(main())
    assert installed == ["b"] and sorted(ca.orders) == ["a.example.test", "b.example.test"]


def test_the_watcher_works_again_in_a_later_event_loop(tmp_path: Path) -> None:
    """Managers are cached per state directory: a second loop (a test, an embedding program)
    must get a watcher and an Event of its own, also when the first loop closed without
    stopping it."""
    now = utcnow()
    store_cert(tmp_path, NAME, now - DAY, now + 89 * DAY)
    ca = FakeCA(tmp_path, settings(check_interval=0.05))
    first = ca.stored(NAME)
    assert first is not None

    async def watch_only() -> None:
        ca.watch(NAME, lambda fresh: None, first)  # the loop then closes; nobody stops it
        await asyncio.sleep(0.01)  # the watcher waits on its Event: now bound to this loop

    asyncio.run(watch_only())
    store_cert(tmp_path, NAME, now, now + 90 * DAY)  # a newer one, stored meanwhile
    assert watched(ca, first, lambda installed: bool(installed))
