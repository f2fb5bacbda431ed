"""The one URL parser: `weft://SECRET@HOST[:PORT]` and route URLs such as `tcp://127.0.0.1:5432`.

Parsing happens once, at the edge; everything after works with frozen value objects.
"""

from __future__ import annotations

import ipaddress
import os
import re

import attrs

from .errors import UsageError

DEFAULT_CONTROL_PORT = 9092
SECRET_ENV = "WEFT_SECRET"

_SCHEME_RE = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$", re.IGNORECASE)
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})?$")


def _split_host_port(text: str, what: str) -> tuple[str, int | None]:
    """Split `host`, `host:port`, `[v6]`, `[v6]:port`, `:port` or `` into (host, port)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UsageError(f"{what}: missing ']' after the IPv6 address in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"{what}: {host!r} is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise UsageError(f"{what}: unexpected {rest!r} after the IPv6 address")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise UsageError(f"{what}: write IPv6 addresses in brackets, like [2001:db8::1]:9092")
    elif ":" in text:
        host, port_text = text.split(":", 1)
    else:
        host, port_text = text, None
    if host and not is_ip_address(host):
        try:
            host = ascii_host_name(host)
        except HostNameError as exc:
            raise UsageError(f"{what}: {exc}") from None
        if not _HOSTNAME_RE.match(host):
            raise UsageError(f"{what}: {host!r} is not a valid host name or address")
    if port_text is None:
        return host, None
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"{what}: port {port_text!r} must be a number from 0 to 65535")
    return host, int(port_text)


def is_ip_address(host: str) -> bool:
    """True for an IPv4 or IPv6 address written as such (not a DNS name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostNameError(ValueError):
    """A name that has no A-label form; the message says what to fix."""


def ascii_host_name(name: str) -> str:
    """The one form of a DNS name that Weft compares: lower case, A-labels (`xn--...`).

    Route names, Host headers, SNI, certificate names and ACME orders must all agree, so they
    all come through here. Non-ASCII names follow IDNA2008 with UTS #46 mapping, as browsers
    do: `faß.example` is `xn--fa-hia.example` (Python's own "idna" codec is IDNA2003 and says
    `fass.example`, a different name). ASCII names are only lower-cased: the idna package is
    slow, and Host headers, nearly always ASCII, must not pay for it.
    """
    if name.isascii():
        return name.lower()
    import idna  # here, not at the top: only the rare non-ASCII name pays for loading it

    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except (UnicodeError, ValueError) as exc:  # idna.IDNAError is a UnicodeError
        raise HostNameError(_idna_advice(name, exc)) from None


def _idna_advice(name: str, exc: Exception) -> str:
    reason = str(exc).rstrip(".")
    fix = ("check the spelling: no empty labels (..), at most 63 characters per label once "
           "converted, letters, digits and hyphens; or give the name in its xn-- form")
    try:
        # The IDNA2003 form still works for names registered before IDNA2008 (☃.net is
        # xn--n3h.net): if DNS holds that form, the user can say so explicitly.
        old = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        old = ""
    if old:
        fix = (f"browsers do not accept this name under IDNA2008; if DNS holds its older "
               f"IDNA2003 form, write that instead: {old}")
    return f"{name!r} is not a valid international domain name ({reason}); {fix}"


def readable_url(url: str) -> str:
    """`https://xn--bcher-kva.example` -> `https://xn--bcher-kva.example (bücher.example)`.

    The URL itself keeps the A-label (every client accepts it, and it is the name routed and
    certified); the Unicode name is added so that users recognise what they typed.
    """
    if "xn--" not in url.lower():
        return url
    try:
        host = parse_route_url(url).host
    except UsageError:
        return url
    import idna  # see ascii_host_name

    try:
        unicode_name = idna.decode(host)
    except (UnicodeError, ValueError):
        return url  # not IDNA2008 (an old IDNA2003 name): the A-label is all we can show
    return url if unicode_name == host.lower() else f"{url} ({unicode_name})"


def format_host_port(host: str, port: int) -> str:
    """`host:port`, with brackets around IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@attrs.frozen
class ServerUrl:
    """Where a tunnel logs in: `weft://SECRET@HOST[:PORT]`."""

    secret: str = attrs.field(repr=lambda _: "'***'")  # never printed, never logged
    host: str
    port: int = DEFAULT_CONTROL_PORT

    @property
    def address(self) -> str:
        return format_host_port(self.host, self.port)

    def redacted(self) -> str:
        return f"weft://***@{self.address}"


def parse_server_url(text: str, environ: dict[str, str] | None = None) -> ServerUrl:
    """Parse `weft://SECRET@HOST[:PORT]`; the secret may come from $WEFT_SECRET instead."""
    env = os.environ if environ is None else environ
    m = _SCHEME_RE.match(text.strip())
    if not m or m.group(1).lower() != "weft":
        raise UsageError(
            f"server URL {_redact(text)!r} must look like weft://SECRET@HOST[:PORT] "
            "(the secret may instead be given in $WEFT_SECRET)"
        )
    rest = m.group(2).rstrip("/")
    secret = ""
    if "@" in rest:
        secret, rest = rest.rsplit("@", 1)
    if not secret:
        secret = env.get(SECRET_ENV, "")
    if not secret:
        raise UsageError(
            "no connection secret: write weft://SECRET@HOST or set $WEFT_SECRET "
            "(weft server prints the secret when it starts)"
        )
    host, port = _split_host_port(rest, "server URL")
    if not host:
        raise UsageError("server URL: the host is missing (weft://SECRET@HOST[:PORT])")
    if port == 0:
        raise UsageError("server URL: the control port must be from 1 to 65535 (default 9092)")
    return ServerUrl(secret=secret, host=host, port=DEFAULT_CONTROL_PORT if port is None else port)


def _redact(text: str) -> str:
    """Hide whatever could be a secret in a URL we are about to complain about.

    Everything before the last `@` may be a secret, whatever the rest looks like.
    """
    head, at, tail = text.rpartition("@")
    if not at:
        return text if len(text) < 16 else text[:8] + "..."  # maybe a secret with no host
    scheme = head.split("://", 1)[0] + "://" if "://" in head else ""
    return f"{scheme}***@{tail}"


@attrs.frozen
class RouteUrl:
    """One side of a route: `scheme://host[:port][/path]`, scheme lower-case, DNS names as
    lower-case A-labels (`ascii_host_name`), IP addresses as written.

    An empty host means "the default" (for a remote tcp/udp side: the address the tunnel logged in
    through); a missing port is None and the protocol plugin decides what it means.
    """

    scheme: str
    host: str
    port: int | None
    path: str = ""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port is None else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.path}"

    def with_port(self, port: int) -> RouteUrl:
        return attrs.evolve(self, port=port)

    def with_host(self, host: str) -> RouteUrl:
        return attrs.evolve(self, host=host)


def parse_route_url(text: str, what: str = "route URL") -> RouteUrl:
    """Parse `tcp://127.0.0.1:5432`, `udp://:0`, `https://app.example.com` and the like."""
    m = _SCHEME_RE.match(text.strip())
    if not m:
        raise UsageError(f"{what} {text!r} needs a scheme, like tcp://127.0.0.1:5432")
    scheme, rest = m.group(1).lower(), m.group(2)
    path = ""
    if "/" in rest:
        rest, path = rest.split("/", 1)
        path = "/" + path
    if "@" in rest:
        raise UsageError(f"{what} {text!r}: user names or secrets do not belong in a route URL")
    host, port = _split_host_port(rest, f"{what} {text!r}")
    return RouteUrl(scheme=scheme, host=host, port=port, path="" if path == "/" else path)
