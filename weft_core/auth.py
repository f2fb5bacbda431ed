"""The login, sans-IO: key derivation, the challenge both ways, the rate limit, and tokens.

Nothing here touches a socket or the clock: callers pass `now`, so every rule is unit-testable.

The protocol (docs/control-api.md has the wire format):
1. The server seals `server-<nonce>` with AES-256-GCM under HKDF(secret), with the SHA-256
   fingerprint of its own TLS certificate as associated data.
2. The client opens it with the fingerprint of the certificate *it* sees. A man in the middle shows
   another certificate, so opening fails and the client stops before revealing anything.
3. The client seals the nonce the same way; the server opens it with its own fingerprint,
   compares in constant time, burns the challenge, and issues a JWT signed with a key that is
   not the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections import OrderedDict

import attrs
import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SERVER_PREFIX = b"server-"
CHALLENGE_TTL = 20.0  # seconds; the issue asks for "within 30 s"
MAX_CHALLENGES = 4096  # outstanding challenges are unauthenticated state: keep it bounded
TOKEN_TTL = 30 * 60
TOKEN_ALGORITHM = "HS256"
TOKEN_AUDIENCE = "weft-tunnel"


class AuthError(Exception):
    """A login step failed; the message is safe to show (it never contains key material)."""


def new_secret() -> str:
    """A fresh connection secret: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def derive_key(secret: str) -> bytes:
    """The AES-256 key for the login challenge: HKDF-SHA256 of the connection secret."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"weft-login-v1", info=b"aes-256-gcm"
    ).derive(secret.encode())


def fingerprint(cert_der: bytes) -> bytes:
    """SHA-256 of a certificate in DER form: what the login is bound to."""
    return hashlib.sha256(cert_der).digest()


def seal(key: bytes, plaintext: bytes, channel: bytes) -> str:
    """AES-256-GCM with a random 96-bit nonce, bound to `channel`; base64 of nonce+ciphertext."""
    iv = os.urandom(12)
    return base64.b64encode(iv + AESGCM(key).encrypt(iv, plaintext, channel)).decode()


def unseal(key: bytes, sealed: str, channel: bytes) -> bytes:
    try:
        blob = base64.b64decode(sealed, validate=True)
    except (ValueError, TypeError):
        raise AuthError("the sealed value is not base64") from None
    if len(blob) < 12 + 16:
        raise AuthError("the sealed value is too short")
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], channel)
    except InvalidTag:
        raise AuthError("the sealed value does not open with this secret and channel") from None


# --- client side -------------------------------------------------------------------------------


def answer_challenge(key: bytes, sealed_challenge: str, channel: bytes) -> str:
    """Check the server's proof and return our sealed answer.

    Raises AuthError if the server does not know the secret, or if the TLS channel we see is not
    the one the server sealed for (a man in the middle).
    """
    try:
        plain = unseal(key, sealed_challenge, channel)
    except AuthError:
        raise AuthError(
            "the server could not prove it knows the secret: either the secret is wrong or "
            "something between you and the server is intercepting TLS"
        ) from None
    if not plain.startswith(SERVER_PREFIX) or len(plain) <= len(SERVER_PREFIX):
        raise AuthError("the server's challenge is malformed")
    return seal(key, plain[len(SERVER_PREFIX) :], channel)


# --- server side -------------------------------------------------------------------------------


@attrs.define
class _Challenge:
    nonce: bytes
    expires: float


class ChallengeStore:
    """Outstanding challenges: single use, short-lived, bounded (oldest evicted first)."""

    def __init__(
        self, key: bytes, channel: bytes, ttl: float = CHALLENGE_TTL, limit: int = MAX_CHALLENGES
    ) -> None:
        self._key = key
        self._channel = channel
        self._ttl = ttl
        self._limit = limit
        self._pending: OrderedDict[str, _Challenge] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def issue(self, now: float) -> tuple[str, str]:
        """A new challenge: (id, sealed `server-<nonce>`)."""
        self._expire(now)
        while len(self._pending) >= self._limit:
            self._pending.popitem(last=False)
        challenge_id = secrets.token_urlsafe(16)
        nonce = secrets.token_hex(32).encode()
        self._pending[challenge_id] = _Challenge(nonce=nonce, expires=now + self._ttl)
        return challenge_id, seal(self._key, SERVER_PREFIX + nonce, self._channel)

    def verify(self, challenge_id: str, sealed_answer: str, now: float) -> bool:
        """True if the answer proves the secret. The challenge is burnt whatever the outcome."""
        self._expire(now)
        challenge = self._pending.pop(challenge_id, None)
        if challenge is None:
            return False
        try:
            answer = unseal(self._key, sealed_answer, self._channel)
        except AuthError:
            return False
        return hmac.compare_digest(answer, challenge.nonce)

    def _expire(self, now: float) -> None:
        # Insertion order is expiry order (constant TTL), so expired ones are at the front.
        while self._pending:
            first = next(iter(self._pending.values()))
            if first.expires > now:
                break
            self._pending.popitem(last=False)


class RateLimiter:
    """Failed logins per source address: at most `burst` in `window` seconds, then refused.

    Bounded: at most `max_sources` addresses are tracked; the least recently failed is forgotten.
    """

    def __init__(self, burst: int = 10, window: float = 60.0, max_sources: int = 10_000) -> None:
        self._burst = burst
        self._window = window
        self._max = max_sources
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def blocked(self, source: str, now: float) -> float:
        """Seconds until `source` may try again; 0 if it may now."""
        times = self._recent(source, now)
        if len(times) < self._burst:
            return 0.0
        return max(0.0, times[0] + self._window - now)

    def failed(self, source: str, now: float) -> None:
        times = self._recent(source, now)
        times.append(now)
        self._failures[source] = times
        self._failures.move_to_end(source)
        while len(self._failures) > self._max:
            self._failures.popitem(last=False)

    def succeeded(self, source: str) -> None:
        self._failures.pop(source, None)

    def _recent(self, source: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(source, ()) if t > now - self._window]
        return times[-self._burst :]


@attrs.frozen
class TokenClaims:
    tunnel: str  # the tunnel this token may act for
    realm: str  # the bind address (and so the secret) it logged in through
    expires: float


class TokenIssuer:
    """Short-lived JWTs naming one tunnel, signed with the server's own key (not the secret)."""

    def __init__(self, signing_key: bytes, ttl: int = TOKEN_TTL) -> None:
        if len(signing_key) < 32:
            raise ValueError("the token signing key must be at least 32 bytes")
        self._key = signing_key
        self.ttl = ttl

    def issue(self, tunnel: str, realm: str, now: float) -> str:
        claims = {
            "sub": tunnel,
            "realm": realm,
            "aud": TOKEN_AUDIENCE,
            "iat": int(now),
            "exp": int(now) + self.ttl,
        }
        return jwt.encode(claims, self._key, algorithm=TOKEN_ALGORITHM)

    def verify(self, token: str, now: float) -> TokenClaims:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[TOKEN_ALGORITHM],
                audience=TOKEN_AUDIENCE,
                # Time is checked below against the caller's `now`, not the real clock.
                options={
                    "require": ["sub", "exp", "aud", "realm"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        if claims["exp"] <= now:
            raise AuthError("the token has expired; log in again")
        return TokenClaims(
            tunnel=str(claims["sub"]), realm=str(claims["realm"]), expires=claims["exp"]
        )
