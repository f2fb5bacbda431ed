"""URL parsing: the server URL (`weft://SECRET@HOST[:PORT]`) and route URLs, and their errors."""

from __future__ import annotations

import idna
import pytest

from weft_core.errors import ExitCode, UsageError
from weft_core.urls import (
    DEFAULT_CONTROL_PORT,
    RouteUrl,
    ServerUrl,
    ascii_host_name,
    format_host_port,
    parse_route_url,
    parse_server_url,
    readable_url,
)

SECRET = "Zm9vYmFyLXNlY3JldC10aGF0LW11c3QtbmV2ZXItbGVhaw"
NO_ENV: dict[str, str] = {}


# --- server URL --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        (f"weft://{SECRET}@198.51.100.1", "198.51.100.1", 9092),
        (f"weft://{SECRET}@198.51.100.1:443", "198.51.100.1", 443),
        (f"weft://{SECRET}@server.example.com", "server.example.com", 9092),
        (f"weft://{SECRET}@server.example.com:10000", "server.example.com", 10000),
        (f"weft://{SECRET}@[2001:db8::1]", "2001:db8::1", 9092),
        (f"weft://{SECRET}@[2001:db8::1]:9000", "2001:db8::1", 9000),
        (f"WEFT://{SECRET}@h/", "h", 9092),  # scheme is case-insensitive, trailing slash ok
        (f"  weft://{SECRET}@h  ", "h", 9092),  # pasted with spaces around
    ],
)
def test_server_url_parses(text: str, host: str, port: int) -> None:
    url = parse_server_url(text, environ=NO_ENV)
    assert url == ServerUrl(secret=SECRET, host=host, port=port)


def test_default_control_port_is_9092() -> None:
    assert DEFAULT_CONTROL_PORT == 9092
    assert parse_server_url(f"weft://{SECRET}@h", environ=NO_ENV).port == 9092


def test_server_url_address_brackets_ipv6() -> None:
    url = parse_server_url(f"weft://{SECRET}@[2001:db8::1]", environ=NO_ENV)
    assert url.address == "[2001:db8::1]:9092"
    assert parse_server_url(f"weft://{SECRET}@10.0.0.1:1", environ=NO_ENV).address == "10.0.0.1:1"


def test_secret_may_contain_at_signs() -> None:
    url = parse_server_url("weft://p@ss@word@h:1", environ=NO_ENV)
    assert (url.secret, url.host, url.port) == ("p@ss@word", "h", 1)


def test_secret_from_environment_when_absent_from_url() -> None:
    env = {"WEFT_SECRET": SECRET}
    assert parse_server_url("weft://198.51.100.1", environ=env).secret == SECRET
    assert parse_server_url("weft://@198.51.100.1:9000", environ=env) == ServerUrl(
        secret=SECRET, host="198.51.100.1", port=9000
    )


def test_secret_in_url_wins_over_environment() -> None:
    url = parse_server_url("weft://from-url@h", environ={"WEFT_SECRET": "from-env"})
    assert url.secret == "from-url"


def test_environ_argument_is_the_only_environment_consulted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WEFT_SECRET", "process-env")
    with pytest.raises(UsageError, match="WEFT_SECRET"):
        parse_server_url("weft://h", environ={})
    # Without `environ`, the process environment is used.
    assert parse_server_url("weft://h").secret == "process-env"


def test_missing_secret_is_a_usage_error_that_says_where_to_put_it() -> None:
    with pytest.raises(UsageError) as err:
        parse_server_url("weft://198.51.100.1", environ=NO_ENV)
    assert "WEFT_SECRET" in err.value.message
    assert "weft://SECRET@HOST" in err.value.message
    assert err.value.exit_code == ExitCode.USAGE


def test_secret_never_in_repr_or_str() -> None:
    url = parse_server_url(f"weft://{SECRET}@h", environ=NO_ENV)
    assert SECRET not in repr(url)
    assert SECRET not in str(url)
    assert url.redacted() == "weft://***@h:9092"
    assert SECRET not in url.redacted()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (f"tcp://{SECRET}@h", "weft://SECRET@HOST"),  # wrong scheme
        (f"weft://{SECRET}@h:99999", "port"),
        (f"weft://{SECRET}@h:abc", "port"),
        (f"weft://{SECRET}@h:", "port"),
        (f"weft://{SECRET}@h:-1", "port"),
        (f"weft://{SECRET}@2001:db8::1", "brackets"),
        (f"weft://{SECRET}@2001:db8::1:9092", "brackets"),
        (f"weft://{SECRET}@[2001:db8::1", "]"),
        (f"weft://{SECRET}@[not-v6]:1", "IPv6"),
        (f"weft://{SECRET}@[2001:db8::1]x", "after the IPv6"),
        (f"weft://{SECRET}@", "host is missing"),
        (f"weft://{SECRET}@:9092", "host is missing"),
        (f"weft://{SECRET}@bad host", "not a valid host"),
        (f"weft://{SECRET}@h/path", "not a valid host"),
    ],
)
def test_bad_server_urls_are_usage_errors_without_the_secret(text: str, needle: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_server_url(text, environ=NO_ENV)
    assert needle in err.value.message
    assert SECRET not in err.value.message
    assert SECRET not in str(err.value)
    assert err.value.exit_code == ExitCode.USAGE


@pytest.mark.parametrize(
    "text",
    [
        f"{SECRET}@198.51.100.1",  # forgot the scheme
        f"weft:/{SECRET}@198.51.100.1",  # one slash
        "http://abc/def@198.51.100.1",  # secret with a slash, wrong scheme
    ],
)
def test_secret_not_echoed_when_the_scheme_is_missing_or_mangled(text: str) -> None:
    secret = text.split("@")[0].split("//")[-1].split(":/")[-1]
    with pytest.raises(UsageError) as err:
        parse_server_url(text, environ=NO_ENV)
    assert secret not in err.value.message


def test_server_url_port_zero_is_refused() -> None:
    with pytest.raises(UsageError, match="port"):
        parse_server_url(f"weft://{SECRET}@h:0", environ=NO_ENV)


# --- route URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp://127.0.0.1:5432", RouteUrl("tcp", "127.0.0.1", 5432)),
        ("tcp://:0", RouteUrl("tcp", "", 0)),
        ("tcp://:15432", RouteUrl("tcp", "", 15432)),
        ("tcp://", RouteUrl("tcp", "", None)),
        ("tcp://198.51.100.1", RouteUrl("tcp", "198.51.100.1", None)),
        ("udp://[::1]:53", RouteUrl("udp", "::1", 53)),
        ("udp://[2001:db8::1]", RouteUrl("udp", "2001:db8::1", None)),
        ("https://app.example.com", RouteUrl("https", "app.example.com", None)),
        ("https://app.example.com/", RouteUrl("https", "app.example.com", None)),
        ("http://localhost:8080/api/v1", RouteUrl("http", "localhost", 8080, "/api/v1")),
        ("TCP://LocalHost:1", RouteUrl("tcp", "localhost", 1)),  # DNS names: one lower-case form
        ("tcp://h:65535", RouteUrl("tcp", "h", 65535)),
    ],
)
def test_route_url_parses(text: str, expected: RouteUrl) -> None:
    assert parse_route_url(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "tcp://127.0.0.1:5432",
        "tcp://:0",
        "tcp://",
        "udp://[::1]:53",
        "https://app.example.com",
        "http://localhost:8080/api/v1",
    ],
)
def test_route_url_str_round_trips(text: str) -> None:
    url = parse_route_url(text)
    assert str(url) == text
    assert parse_route_url(str(url)) == url


def test_route_url_with_port_and_host_are_copies() -> None:
    url = parse_route_url("tcp://:0")
    bound = url.with_host("198.51.100.1").with_port(15432)
    assert str(bound) == "tcp://198.51.100.1:15432"
    assert url == RouteUrl("tcp", "", 0)  # frozen: the original is unchanged
    with pytest.raises(AttributeError):
        url.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("127.0.0.1:5432", "needs a scheme"),
        ("localhost", "needs a scheme"),
        ("", "needs a scheme"),
        ("tcp:/127.0.0.1:5432", "needs a scheme"),
        ("tcp://127.0.0.1:70000", "port"),
        ("tcp://127.0.0.1:http", "port"),
        ("tcp://127.0.0.1:", "port"),
        ("tcp://127.0.0.1:-5", "port"),
        ("udp://::1:53", "brackets"),
        ("udp://::1", "brackets"),
        ("udp://[::1:53", "]"),
        ("udp://[1.2.3.4]:53", "not an IPv6"),
        ("tcp://user:pw@127.0.0.1:22", "do not belong"),
        ("tcp://bad host:1", "not a valid host"),
    ],
)
def test_bad_route_urls_are_clear_usage_errors(text: str, needle: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_route_url(text, "remote URL")
    assert needle in err.value.message
    assert err.value.exit_code == ExitCode.USAGE
    if text:
        assert "remote URL" in err.value.message  # says which argument was wrong


def test_route_url_error_does_not_echo_credentials_and_names_the_url() -> None:
    with pytest.raises(UsageError) as err:
        parse_route_url("tcp://127.0.0.1:99999", "local URL")
    assert "local URL" in err.value.message and "127.0.0.1:99999" in err.value.message


def test_unicode_digit_port_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        parse_route_url("tcp://127.0.0.1:\u00b2")


def test_format_host_port() -> None:
    assert format_host_port("10.0.0.1", 80) == "10.0.0.1:80"
    assert format_host_port("::1", 80) == "[::1]:80"
    assert format_host_port("example.com", 443) == "example.com:443"


# --- international names (IDNA) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host"),
    [
        ("https://bücher.example", "xn--bcher-kva.example"),
        ("https://BÜCHER.Example:8443", "xn--bcher-kva.example"),  # UTS #46 maps case
        ("https://faß.example", "xn--fa-hia.example"),  # IDNA2008, as browsers; not "fass"
        # full-width letters
        ("https://\uff21\uff30\uff30.bücher.example", "app.xn--bcher-kva.example"),
        ("https://xn--bcher-kva.example", "xn--bcher-kva.example"),  # A-label as written
        ("https://App.Example.COM", "app.example.com"),  # ASCII names: lower case only
        ("tcp://a_b.example:1", "a_b.example"),  # underscores stay allowed in ASCII names
    ],
)
def test_route_names_become_lowercase_a_labels(text: str, host: str) -> None:
    assert parse_route_url(text, "remote URL").host == host


def test_server_url_accepts_an_international_name() -> None:
    assert parse_server_url(f"weft://{SECRET}@bücher.example:9000", environ=NO_ENV).host == (
        "xn--bcher-kva.example")


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        # IDNA2008 forbids symbols; the old IDNA2003 form is suggested in case DNS holds it
        ("https://☃.example", ["not a valid international", "xn--n3h.example"]),
        ("https://bücher..example", ["empty label", "remote URL"]),
        ("https://" + "ü" * 70 + ".example", ["63", "remote URL"]),
    ],
)
def test_unconvertible_names_say_what_to_fix(text: str, needles: list[str]) -> None:
    with pytest.raises(UsageError) as err:
        parse_route_url(text, "remote URL")
    for needle in needles:
        assert needle.lower() in err.value.message.lower()
    assert err.value.exit_code == ExitCode.USAGE


def test_ascii_names_never_touch_the_idna_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(*_args: object, **_kwargs: object) -> bytes:
        raise AssertionError("idna used for an ASCII name")

    monkeypatch.setattr(idna, "encode", slow)
    assert ascii_host_name("App.Example.COM") == "app.example.com"
    assert parse_route_url("https://App.Example.COM").host == "app.example.com"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://xn--bcher-kva.example", "https://xn--bcher-kva.example (bücher.example)"),
        ("https://xn--bcher-kva.example:8443",
         "https://xn--bcher-kva.example:8443 (bücher.example)"),
        ("https://app.example.com", "https://app.example.com"),
        ("https://xn--n3h.example", "https://xn--n3h.example"),  # not IDNA2008: left alone
        ("tcp://198.51.100.1:15432", "tcp://198.51.100.1:15432"),
    ],
)
def test_readable_url_adds_the_unicode_name(url: str, shown: str) -> None:
    assert readable_url(url) == shown
