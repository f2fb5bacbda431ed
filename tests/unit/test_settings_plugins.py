"""Command-line settings parsers, the plugin host, and the `weft` command's edges."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pluggy
import pytest

import weft_core
from weft_core import hookspecs
from weft_core.errors import ExitCode, UsageError
from weft_core.plugins import KNOWN_PACKAGES, PluginHost, hookimpl, load_plugins
from weft_core.settings import parse_bind_ips, parse_port_ranges, parse_subnet

# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024-65535", ((1024, 65535),)),
        ("80", ((80, 80),)),
        ("80,443,10000-20000", ((80, 80), (443, 443), (10000, 20000))),
        (" 80 , 443 ,", ((80, 80), (443, 443))),
        ("1-65535", ((1, 65535),)),
    ],
)
def test_parse_port_ranges(text: str, expected: tuple[tuple[int, int], ...]) -> None:
    assert parse_port_ranges(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", ",", "http", "0", "0-10", "70000", "1024-70000", "2000-1000", "1-2-3", "-5", "80;443"],
)
def test_parse_port_ranges_errors_name_the_flag(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_port_ranges(text)
    assert "--allow-ports" in err.value.message
    assert err.value.exit_code == ExitCode.USAGE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("198.51.100.1", ("198.51.100.1",)),
        ("198.51.100.1,203.0.113.7", ("198.51.100.1", "203.0.113.7")),
        ("[2001:db8::1]", ("2001:db8::1",)),
        ("2001:DB8:0::1, 127.0.0.1", ("2001:db8::1", "127.0.0.1")),  # normalised
    ],
)
def test_parse_bind_ips(text: str, expected: tuple[str, ...]) -> None:
    assert parse_bind_ips(text) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "at least one"),
        (",", "at least one"),
        ("example.com", "not an IP"),
        ("198.51.100.1:9092", "not an IP"),
        ("198.51.100.300", "not an IP"),
        ("198.51.100.1,198.51.100.1", "twice"),
        ("2001:db8::1,2001:DB8:0::1", "twice"),  # the same address written two ways
    ],
)
def test_parse_bind_ips_errors(text: str, needle: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_bind_ips(text)
    assert "--bind-ips" in err.value.message and needle in err.value.message


def test_parse_subnet() -> None:
    assert parse_subnet("10.1.0.0/16") == ipaddress.IPv4Network("10.1.0.0/16")
    assert parse_subnet("192.168.7.0/30").num_addresses == 4
    assert parse_subnet("10.0.0.0/8").prefixlen == 8


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("10.1.0.1/16", "not an IPv4 network"),  # host bits set
        ("10.1.0.0/31", "/30"),
        ("10.1.0.0/32", "/30"),
        ("10.0.0.0/7", "/8"),
        ("fd00::/64", "not an IPv4 network"),
        ("nonsense", "not an IPv4 network"),
        ("", "not an IPv4 network"),
    ],
)
def test_parse_subnet_errors(text: str, needle: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_subnet(text)
    assert "--subnet" in err.value.message and needle in err.value.message


def test_parse_port_ranges_open_ended_range_is_refused() -> None:
    with pytest.raises(UsageError):
        parse_port_ranges("1024-")


def test_parse_port_ranges_unicode_digit_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        parse_port_ranges("\u00b2")


# --- plugin host -------------------------------------------------------------------------------


def empty_host() -> PluginHost:
    """A host with no plugins at all, whatever happens to be installed."""
    pm = pluggy.PluginManager("weft")
    pm.add_hookspecs(hookspecs)
    return PluginHost(pm, {})


def test_installed_tcp_plugin_is_found_through_entry_points() -> None:
    host = load_plugins()
    tcp = host.protocol("tcp")
    assert tcp.scheme == "tcp" and tcp.transport == "tcp"
    assert host.protocol("TCP") is tcp  # schemes are case-insensitive
    [info] = [i for i in host.plugins() if "tcp" in i.schemes]
    assert info.name == "tcp"
    assert info.distribution == "weft-tcp"
    assert info.version not in ("", "-")


@pytest.mark.parametrize(
    ("scheme", "package"),
    [("udp", "weft-udp"), ("http", "weft-http"), ("https", "weft-http"), ("tcp", "weft-tcp")],
)
def test_unknown_scheme_names_the_package_to_install(scheme: str, package: str) -> None:
    with pytest.raises(UsageError) as err:
        empty_host().protocol(scheme)
    assert f"pip install {package}" in err.value.message
    assert f"{scheme}://" in err.value.message
    assert err.value.exit_code == ExitCode.USAGE


def test_known_packages_cover_the_bundled_schemes() -> None:
    assert KNOWN_PACKAGES == {
        "tcp": "weft-tcp",
        "udp": "weft-udp",
        "http": "weft-http",
        "https": "weft-http",
    }


def test_unknown_third_party_scheme_points_at_the_docs_and_lists_what_is_served() -> None:
    with pytest.raises(UsageError) as err:
        load_plugins().protocol("gopher")
    message = err.value.message
    assert "gopher://" in message
    assert "docs/plugins.md" in message
    assert "tcp://" in message  # what is served instead


class DemoProtocol:
    scheme = "Demo"
    transport = "tcp"
    local_schemes = ("tcp",)


class DemoPlugin:
    @hookimpl
    def weft_register_protocols(self, register: Any) -> None:
        register(DemoProtocol())


def test_extra_plugin_registers_a_scheme() -> None:
    plugin = DemoPlugin()
    host = load_plugins(extra=[plugin])
    assert isinstance(host.protocol("demo"), DemoProtocol)
    assert isinstance(host.protocol("DEMO"), DemoProtocol)
    infos = {info.name: info for info in host.plugins()}
    demo = [info for info in infos.values() if info.schemes == ("demo",)]
    assert len(demo) == 1
    assert demo[0].distribution == "-"  # not installed from a distribution
    assert "tcp" in infos  # the installed ones are still there
    names = [info.name for info in host.plugins()]
    assert names == sorted(names)


def test_plugin_host_without_plugins_serves_nothing() -> None:
    host = empty_host()
    assert host.plugins() == []
    with pytest.raises(UsageError, match="served: none"):
        host.protocol("tcp")


# --- the weft command --------------------------------------------------------------------------

WEFT = str(Path(sys.executable).with_name("weft"))


def weft(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WEFT_SECRET", "WEFT_DEBUG")}
    return subprocess.run(
        [WEFT, *args], capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL
    )


def assert_usage_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == ExitCode.USAGE, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("weft: error: ")
    for needle in needles:
        assert needle in lines[0]
    assert result.stdout == ""


def test_weft_script_exists() -> None:
    assert Path(WEFT).exists(), f"{WEFT} missing: is weft installed in this venv?"


def test_weft_version() -> None:
    result = weft("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"weft {weft_core.__version__}"


def test_weft_plugins_lists_tcp() -> None:
    result = weft("plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["plugin", "distribution", "version", "schemes"]
    [tcp] = [line for line in lines[1:] if line.split()[0] == "tcp"]
    assert tcp.split()[1] == "weft-tcp"
    assert tcp.split()[-1] == "tcp://"


def test_weft_tunnel_with_an_unserved_scheme_exits_2_in_one_line() -> None:
    result = weft("tunnel", "weft://x@h", "ssh://a:1", "ssh://b:2")
    assert_usage_error(result, "ssh://", "docs/plugins.md")


def test_weft_tunnel_with_an_odd_number_of_urls_exits_2() -> None:
    result = weft("tunnel", "weft://x@h", "tcp://127.0.0.1:5432")
    assert_usage_error(result, "LOCAL REMOTE pairs", "got 1 URL")
    result = weft("tunnel", "weft://x@h", "tcp://127.0.0.1:1", "tcp://:2", "tcp://127.0.0.1:3")
    assert_usage_error(result, "got 3 URLs")


def test_weft_tunnel_with_a_bad_url_exits_2_and_hides_the_secret() -> None:
    result = weft("tunnel", "weft://TopSecretValue@h:99999", "tcp://127.0.0.1:1", "tcp://:2")
    assert_usage_error(result, "port")
    assert "TopSecretValue" not in result.stderr
    result = weft("tunnel", "weft://h", "tcp://127.0.0.1:1", "tcp://:2")  # no secret anywhere
    assert_usage_error(result, "WEFT_SECRET")


def test_weft_without_a_command_prints_help_and_exits_2() -> None:
    result = weft()
    assert result.returncode == ExitCode.USAGE
    assert "usage: weft" in result.stdout
