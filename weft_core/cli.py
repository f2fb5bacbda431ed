"""The `weft` command: parsing and printing only; the work happens in server, tunnel and plugins."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__, loop, telemetry
from .config import load_toml, to_defaults, tunnel_config
from .errors import ApiError, ExitCode, UsageError, WeftError
from .netctx import raise_open_file_limit
from .plugins import PluginHost, load_plugins
from .settings import (
    RouteSpec,
    ServerSettings,
    TunnelSettings,
    parse_bind_ips,
    parse_port_ranges,
    parse_subnet,
)
from .state import default_state_dir
from .urls import parse_route_url, parse_server_url

log = logging.getLogger("weft")

SERVER_EPILOG = """\
examples:
  weft server --bind-ips 198.51.100.1
  weft server --bind-ips 198.51.100.1 --secret-file /etc/weft/secret --allow-ports 10000-20000

The server prints its connection secret and a ready-to-paste `weft tunnel` command. Open the
control port (TCP, default 9092) and the WireGuard port (UDP, default 9093) in your firewall.
"""

TUNNEL_EPILOG = """\
examples:
  weft tunnel weft://SECRET@198.51.100.1 tcp://127.0.0.1:5432 tcp://198.51.100.1:15432
  weft tunnel weft://SECRET@198.51.100.1 tcp://127.0.0.1:22 tcp://:0     (the server picks a port)
  WEFT_SECRET=SECRET weft tunnel weft://198.51.100.1 tcp://127.0.0.1:8080 tcp://:18080

Give LOCAL REMOTE pairs: LOCAL is the service next to this tunnel, REMOTE where the server publishes
it. The remote host may be left empty: the address you connected through is used. The tunnel keeps
reconnecting (and reclaims its ports) until you stop it with Ctrl-C or SIGTERM.

exit codes: 0 stopped cleanly, 2 bad usage, 3 secret refused, 4 server unreachable,
            5 route refused, 6 WireGuard or nftables missing
"""


class CommandRegistry:
    """What `weft_register_commands` hooks receive: add a `weft NAME` subcommand."""

    def __init__(self, subparsers: Any) -> None:
        self._subparsers = subparsers
        self.parsers: dict[str, argparse.ArgumentParser] = subparsers.choices
        self.runners: dict[str, Callable[[argparse.Namespace, PluginHost], int]] = {}

    def add_command(
        self,
        name: str,
        help: str,
        configure: Callable[[argparse.ArgumentParser], None],
        run: Callable[[argparse.Namespace, PluginHost], int],
    ) -> None:
        parser = self._subparsers.add_parser(
            name, help=help, description=help, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        configure(parser)
        self.runners[name] = run


def build_parser(host: PluginHost) -> tuple[argparse.ArgumentParser, CommandRegistry]:
    parser = argparse.ArgumentParser(
        prog="weft",
        description="Publish services from places nothing can reach, through your own server, "
        "over WireGuard.",
        epilog="Start with `weft server --help` on the public host and `weft tunnel --help` "
        "next to the service.",
    )
    parser.add_argument("--version", action="version", version=f"weft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    server = sub.add_parser(
        "server",
        help="run the public server",
        description="Run the public Weft server that tunnels connect to.",
        epilog=SERVER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    server.add_argument(
        "--bind-ips",
        metavar="IP[,IP...]",
        help="addresses to listen on (default: all of this host's addresses)",
    )
    server.add_argument("--port", type=int, default=9092, help="control port, TCP (default 9092)")
    server.add_argument(
        "--wireguard-port", type=int, default=9093, help="WireGuard port, UDP (default 9093)"
    )
    server.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="read settings from a TOML file (keys are these flags' names; flags win)",
    )
    server.add_argument(
        "--use-secret-per-ip",
        action="store_true",
        help="give each bind address its own secret (with --secret-file: PATH.<ip> per address)",
    )
    server.add_argument(
        "--secret-file",
        type=Path,
        metavar="PATH",
        help="also write the connection secret to PATH (mode 0600)",
    )
    server.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help=f"where secrets and keys persist (default {default_state_dir()})",
    )
    server.add_argument(
        "--subnet",
        default="10.1.0.0/16",
        help="WireGuard address pool; the server takes .1 (default 10.1.0.0/16)",
    )
    server.add_argument(
        "--allow-ports",
        default="1024-65535",
        metavar="RANGES",
        help="public ports tunnels may ask for, like 1024-65535 or 80,443,20000-21000",
    )
    server.add_argument(
        "--idle-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="close visitor connections idle this long (default 3600)",
    )
    server.add_argument(
        "--health-timeout",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="reclaim a tunnel silent this long (default 20)",
    )
    server.add_argument(
        "--drain-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM, let open connections finish this long (default 5)",
    )
    _common(server)
    telemetry.add_options(server, "server")
    host.call_each("weft_server_options", parser=server)

    tunnel = sub.add_parser(
        "tunnel",
        help="publish local services through a server",
        description="Publish local services through a Weft server.",
        epilog=TUNNEL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tunnel.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="read the server, routes and options from a TOML file (see docs/operations.md)",
    )
    tunnel.add_argument(
        "server_url",
        nargs="?",
        metavar="weft://SECRET@HOST[:PORT]",
        help="the server to connect to (the secret may come from $WEFT_SECRET)",
    )
    tunnel.add_argument(
        "urls",
        nargs="*",
        metavar="LOCAL REMOTE",
        help="pairs of local and remote URLs, like tcp://127.0.0.1:5432 tcp://:15432",
    )
    tunnel.add_argument(
        "--name",
        help="a name for this tunnel in logs and lists (default: host name and a short id)",
    )
    tunnel.add_argument(
        "--idle-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="close connections idle this long (default 3600)",
    )
    tunnel.add_argument(
        "--keep-trying",
        action="store_true",
        help="retry even if the very first connection fails (default: exit)",
    )
    _common(tunnel)
    telemetry.add_options(tunnel, "tunnel")
    host.call_each("weft_tunnel_options", parser=tunnel)

    sub.add_parser(
        "plugins",
        help="list installed plugins and the URL schemes they serve",
        description="List installed plugins and the URL schemes they serve.",
        epilog="example:\n  weft plugins\n\nA scheme missing here? pip install weft-udp (udp://) "
        "or weft-http (http://, https://); third-party plugins: see docs/plugins.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    listing = sub.add_parser(
        "list",
        help="list the tunnels on a server",
        description="List the tunnels a server holds.",
        epilog="example:\n  weft list weft://SECRET@198.51.100.1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listing.add_argument("server_url", metavar="weft://SECRET@HOST[:PORT]")
    listing.add_argument("--json", action="store_true", help="print JSON for scripts")
    listing.add_argument("-l", "--long", action="store_true", help="human-readable sizes")

    proxy = sub.add_parser(
        "proxy",
        help="relay SRC to DST locally, without a server",
        description="Accept on SRC and relay to DST with the same plugins and relay as tunnels.",
        epilog="examples:\n"
        "  weft proxy tcp://0.0.0.0:8080 tcp://127.0.0.1:80\n"
        "  weft proxy udp://127.0.0.1:5353 udp://127.0.0.1:53",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    proxy.add_argument("src", metavar="SRC", help="where to accept, like tcp://0.0.0.0:8080")
    proxy.add_argument("dst", metavar="DST", help="where to relay to, like tcp://127.0.0.1:80")
    proxy.add_argument(
        "--idle-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="close connections idle this long (default 3600)",
    )
    proxy.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    proxy.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="text or json log lines"
    )
    host.call_each("weft_tunnel_options", parser=proxy)

    commands = CommandRegistry(sub)
    host.call_each("weft_register_commands", cli=commands)
    return parser, commands


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log every connection (visitor, bytes, duration, how it ended)",
    )
    parser.add_argument(
        "--wireguard-backend",
        choices=("auto", "kernel", "wireguard-go"),
        default="auto",
        help="force a WireGuard backend (default: kernel if available, else wireguard-go)",
    )
    parser.add_argument(
        "--no-isolation",
        action="store_true",
        help="run without the nftables isolation rules (not recommended)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text (default) or as one JSON object per line, for collectors",
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors (`--log-format json`)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(args: argparse.Namespace, default: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    level = logging.INFO if args.verbose else default
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get("WEFT_DEBUG") else level, handlers=[handler]
    )


def _port(value: int, flag: str) -> int:
    if not 1 <= value <= 65535:
        raise UsageError(f"{flag} must be a port number from 1 to 65535, not {value}")
    return value


def server_settings(args: argparse.Namespace) -> ServerSettings:
    if args.use_secret_per_ip and not args.bind_ips:
        raise UsageError("--use-secret-per-ip needs --bind-ips: one secret per listed address")
    port = _port(args.port, "--port")
    wg_port = _port(args.wireguard_port, "--wireguard-port")
    if port == wg_port:
        pass  # different protocols (TCP and UDP): allowed
    return ServerSettings(
        bind_ips=parse_bind_ips(args.bind_ips) if args.bind_ips else ("0.0.0.0",),
        port=port,
        wireguard_port=wg_port,
        state_dir=args.state_dir or default_state_dir(),
        secret_file=args.secret_file,
        subnet=parse_subnet(args.subnet),
        allow_ports=parse_port_ranges(args.allow_ports),
        verbose=args.verbose,
        isolation=not args.no_isolation,
        wireguard_backend=args.wireguard_backend,
        secret_per_ip=args.use_secret_per_ip,
        idle_timeout=args.idle_timeout,
        health_timeout=args.health_timeout,
        drain_timeout=args.drain_timeout,
    )


def tunnel_settings(
    args: argparse.Namespace, config: tuple[str | None, list[Any]] | None = None
) -> TunnelSettings:
    server_text, config_routes = config if config is not None else (None, [])
    server_text = args.server_url or server_text
    if not server_text:
        raise UsageError("give the server, like weft://SECRET@HOST, or a --config file naming it")
    server = parse_server_url(server_text)
    if len(args.urls) % 2:
        raise UsageError(
            "give LOCAL REMOTE pairs, like tcp://127.0.0.1:5432 tcp://:15432 "
            f"(got {len(args.urls)} URL{'s' if len(args.urls) != 1 else ''})"
        )
    pairs: list[tuple[str, str, dict[str, Any]]] = [
        (local, remote, {}) for local, remote in zip(args.urls[::2], args.urls[1::2], strict=True)
    ]
    routes = tuple(
        RouteSpec(
            parse_route_url(local, "local URL"), parse_route_url(remote, "remote URL"), options
        )
        for local, remote, options in pairs + list(config_routes)
    )
    if not routes:
        raise UsageError("give at least one LOCAL REMOTE pair, like tcp://127.0.0.1:5432 tcp://:0")
    name = args.name or f"{socket.gethostname()[:24]}-{os.getpid()}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise UsageError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (64 at most)")
    return TunnelSettings(
        server=server,
        routes=routes,
        name=name,
        verbose=args.verbose,
        isolation=not args.no_isolation,
        wireguard_backend=args.wireguard_backend,
        idle_timeout=args.idle_timeout,
    )


def _print_plugins(host: PluginHost) -> int:
    infos = host.plugins()
    if not infos:
        print("no plugins installed: pip install weft-tcp weft-udp weft-http")
        return ExitCode.OK
    print(f"{'plugin':<16} {'distribution':<20} {'version':<10} schemes")
    for info in infos:
        schemes = ", ".join(f"{s}://" for s in info.schemes) or "-"
        print(f"{info.name:<16} {info.distribution:<20} {info.version:<10} {schemes}")
    return ExitCode.OK


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _ago(then: float, now: float) -> str:
    seconds = max(0, int(now - then))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def format_tunnels(tunnels: list[dict[str, Any]], human: bool, now: float) -> str:
    """The `weft list` table: one row per route (a tunnel without routes gets one row)."""
    size = human_size if human else (lambda n: str(int(n)))
    header = ("NAME", "WG ADDRESS", "PUBLIC", "LOCAL", "IN", "OUT", "DATAGRAMS", "CONNS", "FAILED",
              "SINCE", "LAST SEEN")
    rows = [header]
    for t in tunnels:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t["connected_since"]))
        routes = t["routes"] or [
            {"public_url": "-", "local": "-", "bytes_in": 0, "bytes_out": 0, "connections": 0}
        ]
        for r in routes:
            rows.append(
                (
                    t["name"],
                    t["address"],
                    r["public_url"],
                    r["local"],
                    size(r["bytes_in"]),
                    size(r["bytes_out"]),
                    _datagrams(r),
                    str(r["connections"]),
                    str(_failed(r)),
                    since,
                    _ago(t["last_seen"], now),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if 4 <= i <= 8 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def _failed(route: dict[str, Any]) -> int:
    """Connections that could not be relayed and datagrams dropped, on the server and (as its
    health checks report) on the tunnel: a local service that is down shows here."""
    tunnel = route.get("tunnel") or {}
    return sum(int(side.get(name, 0)) for side in (route, tunnel) for name in ("failed", "dropped"))


def _datagrams(route: dict[str, Any]) -> str:
    """`in/out` datagrams of a datagram route (udp://), `-` for stream routes."""
    d_in, d_out = int(route.get("datagrams_in", 0)), int(route.get("datagrams_out", 0))
    if not (d_in or d_out) and not str(route.get("public_url", "")).startswith("udp:"):
        return "-"
    return f"{d_in}/{d_out}"


def _list_tunnels(args: argparse.Namespace) -> int:
    from .control.client import ControlClient

    client = ControlClient(parse_server_url(args.server_url), "list-" + os.urandom(6).hex())
    answer = asyncio.run(client.call("GET", "/tunnels"))
    tunnels = answer.get("tunnels", [])
    if args.json:
        print(json.dumps(tunnels, indent=2))
    elif not tunnels:
        print("no tunnels")
    else:
        print(format_tunnels(tunnels, args.long, time.time()))
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        host = load_plugins()
        parser, commands = build_parser(host)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return ExitCode.USAGE
        config = None
        if args.command in ("server", "tunnel") and args.config is not None:
            # Settings from the file become defaults; flags on the command line still win.
            sub = commands.parsers[args.command]
            if args.command == "tunnel":
                server_text, routes, defaults = tunnel_config(sub, args.config)
                config = (server_text, routes)
            else:
                defaults = to_defaults(sub, load_toml(args.config), str(args.config))
            sub.set_defaults(**defaults)
            args = parser.parse_args(argv)
        if args.command in ("server", "tunnel", "proxy"):
            raise_open_file_limit()  # two sockets per relayed connection
        if args.command == "server":
            from .server import run_server

            settings = server_settings(args)
            telemetry.settings_from_options(args)  # bad telemetry flags: exit 2 before starting
            _setup_logging(args, logging.INFO)
            return loop.run(run_server(settings, args, host))
        if args.command == "tunnel":
            from .tunnel import run_tunnel

            tsettings = tunnel_settings(args, config)
            telemetry.settings_from_options(args)
            _setup_logging(args, logging.WARNING)
            return loop.run(run_tunnel(tsettings, args, host))
        if args.command == "proxy":
            from .proxy import run_proxy

            _setup_logging(args, logging.WARNING)
            src = parse_route_url(args.src, "SRC")
            dst = parse_route_url(args.dst, "DST")
            return loop.run(run_proxy(src, dst, args, host))
        if args.command == "plugins":
            return _print_plugins(host)
        if args.command == "list":
            return _list_tunnels(args)
        return commands.runners[args.command](args, host)
    except WeftError as exc:
        print(f"weft: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except ApiError as exc:
        print(f"weft: error: the server refused: {exc.message}", file=sys.stderr)
        return ExitCode.LOGIN_REFUSED if exc.status == 401 else ExitCode.ROUTE_REFUSED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
