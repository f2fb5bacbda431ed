"""The login, sans-IO: both sides of the challenge, its limits, the rate limiter and tokens."""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import os

import jwt
import pytest

from weft_core import auth
from weft_core.auth import (
    AuthError,
    ChallengeStore,
    RateLimiter,
    TokenIssuer,
    answer_challenge,
    derive_key,
    fingerprint,
    seal,
    unseal,
)

SECRET = auth.new_secret()
KEY = derive_key(SECRET)
CERT_DER = b"0\x82\x01 pretend this is the server's certificate"
CHANNEL = fingerprint(CERT_DER)
MITM_CHANNEL = fingerprint(b"0\x82\x01 the interceptor's certificate")
T0 = 1_000_000.0


def login(store: ChallengeStore, key: bytes, channel: bytes, now: float = T0) -> bool:
    """One full login: the server issues, the client answers, the server verifies."""
    challenge_id, sealed = store.issue(now)
    answer = answer_challenge(key, sealed, channel)
    return store.verify(challenge_id, answer, now)


# --- primitives --------------------------------------------------------------------------------


def test_new_secret_is_32_random_bytes_url_safe() -> None:
    secret = auth.new_secret()
    assert len(secret) == 43
    assert len(base64.urlsafe_b64decode(secret + "=")) == 32
    assert set(secret) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert auth.new_secret() != secret


def test_derive_key_is_deterministic_256_bit_and_not_the_secret() -> None:
    assert derive_key(SECRET) == KEY
    assert len(KEY) == 32
    assert SECRET.encode() != KEY
    assert derive_key(SECRET + "x") != KEY


def test_fingerprint_is_sha256_of_der() -> None:
    assert fingerprint(CERT_DER) == hashlib.sha256(CERT_DER).digest()


def test_seal_format_is_base64_of_iv_and_aes_gcm_ciphertext() -> None:
    sealed = seal(KEY, b"hello", CHANNEL)
    blob = base64.b64decode(sealed, validate=True)
    assert len(blob) == 12 + len(b"hello") + 16  # IV, ciphertext, GCM tag
    assert unseal(KEY, sealed, CHANNEL) == b"hello"
    assert seal(KEY, b"hello", CHANNEL) != sealed  # a fresh IV every time


@pytest.mark.parametrize(
    "sealed",
    ["not base64!", "", base64.b64encode(b"short").decode(), "é" * 40],
)
def test_unseal_rejects_garbage_with_auth_error(sealed: str) -> None:
    with pytest.raises(AuthError):
        unseal(KEY, sealed, CHANNEL)


def test_unseal_rejects_tampered_ciphertext() -> None:
    blob = bytearray(base64.b64decode(seal(KEY, b"hello", CHANNEL)))
    blob[-1] ^= 1
    with pytest.raises(AuthError):
        unseal(KEY, base64.b64encode(bytes(blob)).decode(), CHANNEL)


# --- the challenge both ways -------------------------------------------------------------------


def test_full_login_succeeds() -> None:
    store = ChallengeStore(KEY, CHANNEL)
    assert login(store, KEY, CHANNEL)
    assert len(store) == 0  # burnt


def test_challenge_plaintext_is_server_prefix_and_nonce() -> None:
    store = ChallengeStore(KEY, CHANNEL)
    _, sealed = store.issue(T0)
    plain = unseal(KEY, sealed, CHANNEL)
    assert plain.startswith(b"server-")
    assert len(plain) > len(b"server-") + 16


def test_client_answer_is_the_sealed_nonce() -> None:
    store = ChallengeStore(KEY, CHANNEL)
    _, sealed = store.issue(T0)
    nonce = unseal(KEY, sealed, CHANNEL)[len(b"server-") :]
    assert unseal(KEY, answer_challenge(KEY, sealed, CHANNEL), CHANNEL) == nonce


def test_client_refuses_a_server_that_does_not_know_the_secret() -> None:
    impostor = ChallengeStore(derive_key("not the secret"), CHANNEL)
    _, sealed = impostor.issue(T0)
    with pytest.raises(AuthError, match=r"secret is wrong or .* intercepting TLS"):
        answer_challenge(KEY, sealed, CHANNEL)


def test_server_refuses_a_client_that_does_not_know_the_secret() -> None:
    store = ChallengeStore(KEY, CHANNEL)
    challenge_id, _ = store.issue(T0)
    # A client with the wrong secret cannot open the challenge, so all it can send is a guess
    # sealed under its own key.
    guess = seal(derive_key("not the secret"), b"0" * 64, CHANNEL)
    assert store.verify(challenge_id, guess, T0) is False


def test_server_refuses_a_right_key_but_wrong_nonce() -> None:
    store = ChallengeStore(KEY, CHANNEL)
    challenge_id, _ = store.issue(T0)
    assert store.verify(challenge_id, seal(KEY, b"0" * 64, CHANNEL), T0) is False


def test_man_in_the_middle_with_another_certificate_fails_on_the_client() -> None:
    store = ChallengeStore(KEY, CHANNEL)  # the real server seals for its own certificate
    _, sealed = store.issue(T0)
    # The client sees the interceptor's certificate: the challenge does not open.
    with pytest.raises(AuthError):
        answer_challenge(KEY, sealed, MITM_CHANNEL)


def test_answer_relayed_from_another_channel_fails_on_the_server() -> None:
    # Even an answer sealed on another channel (e.g. replayed by an interceptor) is refused.
    store = ChallengeStore(KEY, CHANNEL)
    challenge_id, sealed = store.issue(T0)
    nonce = unseal(KEY, sealed, CHANNEL)[len(b"server-") :]
    assert store.verify(challenge_id, seal(KEY, nonce, MITM_CHANNEL), T0) is False


def test_client_refuses_a_challenge_without_the_server_prefix() -> None:
    # A sealed value the client itself could have produced (an answer) is not a server proof:
    # without the prefix an attacker could reflect the client's own answer back at it.
    with pytest.raises(AuthError, match="malformed"):
        answer_challenge(KEY, seal(KEY, b"client-nonce", CHANNEL), CHANNEL)
    with pytest.raises(AuthError, match="malformed"):
        answer_challenge(KEY, seal(KEY, b"server-", CHANNEL), CHANNEL)


def test_challenge_is_single_use() -> None:
    store = ChallengeStore(KEY, CHANNEL)
    challenge_id, sealed = store.issue(T0)
    answer = answer_challenge(KEY, sealed, CHANNEL)
    assert store.verify(challenge_id, answer, T0) is True
    assert store.verify(challenge_id, answer, T0) is False


def test_wrong_answer_burns_the_challenge_too() -> None:
    store = ChallengeStore(KEY, CHANNEL)
    challenge_id, sealed = store.issue(T0)
    assert store.verify(challenge_id, "garbage", T0) is False
    # No second guess on the same challenge.
    assert store.verify(challenge_id, answer_challenge(KEY, sealed, CHANNEL), T0) is False


def test_answer_to_one_challenge_does_not_open_another() -> None:
    store = ChallengeStore(KEY, CHANNEL)
    _, sealed_a = store.issue(T0)
    id_b, _ = store.issue(T0)
    assert store.verify(id_b, answer_challenge(KEY, sealed_a, CHANNEL), T0) is False


def test_unknown_challenge_id_fails() -> None:
    store = ChallengeStore(KEY, CHANNEL)
    _, sealed = store.issue(T0)
    assert store.verify("no-such-id", answer_challenge(KEY, sealed, CHANNEL), T0) is False


def test_challenge_ttl_within_30_seconds() -> None:
    assert 0 < auth.CHALLENGE_TTL <= 30


def test_challenge_expires_after_ttl() -> None:
    store = ChallengeStore(KEY, CHANNEL, ttl=20.0)
    challenge_id, sealed = store.issue(T0)
    answer = answer_challenge(KEY, sealed, CHANNEL)
    assert store.verify(challenge_id, answer, T0 + 20.0) is False

    challenge_id, sealed = store.issue(T0)
    answer = answer_challenge(KEY, sealed, CHANNEL)
    assert store.verify(challenge_id, answer, T0 + 19.9) is True


def test_expired_challenges_are_dropped_from_the_store() -> None:
    store = ChallengeStore(KEY, CHANNEL, ttl=5.0)
    for i in range(10):
        store.issue(T0 + i * 0.1)
    assert len(store) == 10
    store.issue(T0 + 100)
    assert len(store) == 1


def test_store_is_bounded_and_evicts_oldest_first() -> None:
    store = ChallengeStore(KEY, CHANNEL, limit=3)
    issued = [store.issue(T0) for _ in range(4)]
    assert len(store) == 3
    oldest_id, oldest_sealed = issued[0]
    assert store.verify(oldest_id, answer_challenge(KEY, oldest_sealed, CHANNEL), T0) is False
    newest_id, newest_sealed = issued[-1]
    assert store.verify(newest_id, answer_challenge(KEY, newest_sealed, CHANNEL), T0) is True


def test_default_store_bound() -> None:
    assert 0 < auth.MAX_CHALLENGES <= 100_000


def test_challenge_ids_and_nonces_are_unique() -> None:
    store = ChallengeStore(KEY, CHANNEL)
    ids = set()
    plains = set()
    for _ in range(50):
        challenge_id, sealed = store.issue(T0)
        ids.add(challenge_id)
        plains.add(unseal(KEY, sealed, CHANNEL))
    assert len(ids) == len(plains) == 50


# --- rate limiter ------------------------------------------------------------------------------


def test_rate_limiter_allows_burst_then_blocks() -> None:
    limiter = RateLimiter(burst=3, window=60.0)
    for i in range(3):
        assert limiter.blocked("198.51.100.7", T0 + i) == 0
        limiter.failed("198.51.100.7", T0 + i)
    wait = limiter.blocked("198.51.100.7", T0 + 3)
    assert wait == pytest.approx(57.0)  # the oldest failure (T0) leaves the window at T0+60
    assert limiter.blocked("203.0.113.9", T0 + 3) == 0  # per source address


def test_rate_limiter_window_slides() -> None:
    limiter = RateLimiter(burst=2, window=10.0)
    limiter.failed("a", T0)
    limiter.failed("a", T0 + 5)
    assert limiter.blocked("a", T0 + 6) > 0
    assert limiter.blocked("a", T0 + 10.5) == 0  # the first failure aged out
    limiter.failed("a", T0 + 11)
    assert limiter.blocked("a", T0 + 11) > 0


def test_rate_limiter_resets_on_success() -> None:
    limiter = RateLimiter(burst=2, window=60.0)
    limiter.failed("a", T0)
    limiter.failed("a", T0)
    assert limiter.blocked("a", T0) > 0
    limiter.succeeded("a")
    assert limiter.blocked("a", T0) == 0


def test_rate_limiter_tracks_a_bounded_number_of_sources() -> None:
    limiter = RateLimiter(burst=1, window=60.0, max_sources=100)
    for i in range(1000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}", T0)
    assert len(limiter._failures) == 100
    # The most recent ones are remembered, the oldest forgotten.
    assert limiter.blocked("10.0.3.231", T0) > 0  # i == 999
    assert limiter.blocked("10.0.0.0", T0) == 0


def test_rate_limiter_memory_per_source_is_bounded() -> None:
    limiter = RateLimiter(burst=5, window=60.0)
    for i in range(1000):
        limiter.failed("a", T0 + i * 0.001)
    assert len(limiter._failures["a"]) <= 5 + 1  # the last `burst` plus the newest


# --- tokens ------------------------------------------------------------------------------------

SIGNING_KEY = os.urandom(32)


def test_token_round_trip_names_tunnel_and_realm() -> None:
    issuer = TokenIssuer(SIGNING_KEY)
    token = issuer.issue("t-abc", "198.51.100.1", T0)
    claims = issuer.verify(token, T0 + 1)
    assert claims.tunnel == "t-abc"
    assert claims.realm == "198.51.100.1"
    assert claims.expires == T0 + auth.TOKEN_TTL


def test_token_lifetime_is_about_30_minutes() -> None:
    assert 15 * 60 <= auth.TOKEN_TTL <= 60 * 60
    assert TokenIssuer(SIGNING_KEY).ttl == auth.TOKEN_TTL


def test_token_payload_claims() -> None:
    token = TokenIssuer(SIGNING_KEY).issue("t-abc", "198.51.100.1", T0)
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload == {
        "sub": "t-abc",
        "realm": "198.51.100.1",
        "aud": "weft-tunnel",
        "iat": int(T0),
        "exp": int(T0) + auth.TOKEN_TTL,
    }
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_expired_token_is_refused() -> None:
    issuer = TokenIssuer(SIGNING_KEY, ttl=60)
    token = issuer.issue("t", "r", T0)
    issuer.verify(token, T0 + 59)
    with pytest.raises(AuthError, match="expired"):
        issuer.verify(token, T0 + 60)


def test_token_signed_with_another_key_is_refused() -> None:
    token = TokenIssuer(os.urandom(32)).issue("t", "r", T0)
    with pytest.raises(AuthError):
        TokenIssuer(SIGNING_KEY).verify(token, T0)


def test_tampered_token_is_refused() -> None:
    issuer = TokenIssuer(SIGNING_KEY)
    header, payload, signature = issuer.issue("t-mine", "r", T0).split(".")
    claims = jwt.decode(f"{header}.{payload}.{signature}", options={"verify_signature": False})
    claims["sub"] = "t-someone-else"
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(AuthError):
        issuer.verify(f"{header}.{forged_payload}.{signature}", T0)
    with pytest.raises(AuthError):
        issuer.verify(f"{header}.{payload}.{signature[:-2]}xx", T0)


def test_unsigned_token_is_refused() -> None:
    claims = {"sub": "t", "realm": "r", "aud": "weft-tunnel", "exp": int(T0) + 60}
    token = jwt.encode(claims, key=None, algorithm="none")  # type: ignore[arg-type]
    with pytest.raises(AuthError):
        TokenIssuer(SIGNING_KEY).verify(token, T0)


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "t", "realm": "r", "aud": "someone-else", "exp": int(T0) + 60},
        {"sub": "t", "realm": "r", "exp": int(T0) + 60},  # no audience
        {"sub": "t", "aud": "weft-tunnel", "exp": int(T0) + 60},  # no realm
        {"realm": "r", "aud": "weft-tunnel", "exp": int(T0) + 60},  # no tunnel
        {"sub": "t", "realm": "r", "aud": "weft-tunnel"},  # no expiry
    ],
)
def test_token_with_wrong_audience_or_missing_claims_is_refused(claims: dict[str, object]) -> None:
    token = jwt.encode(claims, SIGNING_KEY, algorithm="HS256")
    with pytest.raises(AuthError):
        TokenIssuer(SIGNING_KEY).verify(token, T0)


@pytest.mark.parametrize("garbage", ["", "x", "a.b.c", "é.é.é", "Bearer x"])
def test_garbage_token_is_auth_error(garbage: str) -> None:
    with pytest.raises(AuthError):
        TokenIssuer(SIGNING_KEY).verify(garbage, T0)


def test_signing_key_must_be_long() -> None:
    with pytest.raises(ValueError):
        TokenIssuer(b"short")


def test_token_forged_with_the_connection_secret_is_refused() -> None:
    """Knowing the connection secret is enough to log in, not to mint tokens."""
    issuer = TokenIssuer(SIGNING_KEY)
    claims = {"sub": "t", "realm": "r", "aud": "weft-tunnel", "exp": int(T0) + 60}
    for key in (SECRET.encode(), derive_key(SECRET)):
        with pytest.raises(AuthError):
            issuer.verify(jwt.encode(claims, key, algorithm="HS256"), T0)


def test_server_signing_key_is_not_the_secret(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    from weft_core.plugins import load_plugins
    from weft_core.server import Server
    from weft_core.settings import ServerSettings

    settings = ServerSettings(
        bind_ips=("127.0.0.1",),
        port=9092,
        wireguard_port=9093,
        state_dir=Path(tmp_path) / "state",
        secret_file=None,
        subnet=ipaddress.IPv4Network("10.1.0.0/16"),
        allow_ports=((1024, 65535),),
    )
    server = Server(settings, argparse.Namespace(), load_plugins())
    server._load_state()
    assert len(server.token_key) >= 32
    assert server.token_key != server.secret.encode()
    assert server.token_key != derive_key(server.secret)
    assert (Path(tmp_path) / "state" / "token.key").stat().st_mode & 0o777 == 0o600
    claims = {"sub": "t", "realm": "r", "aud": "weft-tunnel", "exp": int(T0) + 60}
    forged = jwt.encode(claims, server.secret.encode(), algorithm="HS256")
    with pytest.raises(AuthError):
        server.tokens.verify(forged, T0)
    # And a token the server issues verifies with its own issuer.
    assert server.tokens.verify(server.tokens.issue("t", "r", T0), T0).tunnel == "t"


def test_token_verification_uses_only_the_given_time() -> None:
    future = 4_000_000_000.0  # year 2096
    issuer = TokenIssuer(SIGNING_KEY)
    assert issuer.verify(issuer.issue("t", "r", future), future + 1).tunnel == "t"
