"""TOML configuration files for `weft server --config` and `weft tunnel --config`.

A file mirrors the command line: every key is a flag's name without the dashes (`bind-ips` or
`bind_ips`); flags given on the command line win over the file. A tunnel file also lists its routes:

    server = "weft://198.51.100.1"      # the secret from $WEFT_SECRET, or weft://SECRET@HOST
    name = "lab"

    [[routes]]
    local = "tcp://127.0.0.1:5432"
    remote = "tcp://:15432"

    [[routes]]
    local = "http://127.0.0.1:8080"
    remote = "https://app.example.com"
    tls-secret = "/etc/weft/app.pem"     # per-route options: the tunnel flags of the route's plugin
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from .errors import UsageError

_SKIP = {"help", "config", "command", "server_url", "urls"}


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None


def flag_dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in _SKIP and a.option_strings}


def to_defaults(
    parser: argparse.ArgumentParser, table: dict[str, Any], where: str
) -> dict[str, Any]:
    """Map `{flag-name: value}` to argparse defaults, refusing unknown keys and wrong types."""
    dests = flag_dests(parser)
    defaults: dict[str, Any] = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        action = dests.get(dest)
        if action is None:
            known = ", ".join(sorted(d.replace("_", "-") for d in dests))
            raise UsageError(f"{where}: unknown setting {key!r} (known: {known})")
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            if not isinstance(value, bool):
                raise UsageError(f"{where}: {key} must be true or false")
        elif action.type is not None and not isinstance(value, bool):
            try:
                value = action.type(value)  # type: ignore[operator]
            except (TypeError, ValueError):
                raise UsageError(f"{where}: {key} has a bad value {value!r}") from None
        elif not isinstance(value, str | int | float):
            raise UsageError(f"{where}: {key} must be a string or a number")
        if action.choices is not None and value not in action.choices:
            raise UsageError(f"{where}: {key} must be one of {', '.join(map(str, action.choices))}")
        defaults[dest] = value
    return defaults


def tunnel_config(
    parser: argparse.ArgumentParser, path: Path
) -> tuple[str | None, list[tuple[str, str, dict[str, Any]]], dict[str, Any]]:
    """(server URL, [(local, remote, per-route option overrides)], tunnel-wide defaults)."""
    data = load_toml(path)
    server = data.pop("server", None)
    if server is not None and not isinstance(server, str):
        raise UsageError(f"{path}: server must be a string like weft://HOST")
    routes_table = data.pop("routes", [])
    if not isinstance(routes_table, list) or not all(isinstance(r, dict) for r in routes_table):
        raise UsageError(f"{path}: routes must be a list of [[routes]] tables")
    routes = []
    for i, entry in enumerate(routes_table, 1):
        entry = dict(entry)
        local, remote = entry.pop("local", None), entry.pop("remote", None)
        if not isinstance(local, str) or not isinstance(remote, str):
            raise UsageError(f'{path}: route {i} needs local = "..." and remote = "..."')
        routes.append((local, remote, to_defaults(parser, entry, f"{path}: route {i}")))
    return server, routes, to_defaults(parser, data, str(path))
