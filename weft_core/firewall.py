"""Peer isolation with a dedicated nftables table per WireGuard interface.

Weft owns the whole table `inet weft_<ifname>`: each apply() makes or replaces it in one
`nft -f -` transaction, so there is never a moment with half the rules, and close() deletes it.
Other tables are never touched. Drops in any base chain are final in nftables, so this works next
to the host's own firewall.

Each `nft` run costs more with every table on the host (nft 1.0 reads the whole ruleset first),
and a transaction that deletes a table also waits for the kernel to retire it (~15 ms). So the
first load creates the table (`create table` fails rather than merge if a leftover of that name
exists; only then is it replaced), and the check that nft works looks up one table, not all.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from ipaddress import IPv6Address, ip_address

from weft_core.errors import ExitCode, WeftError

_NFT_MISSING = (
    "nftables is required for peer isolation: apt-get install nftables "
    "(or pass --no-isolation to run without it)"
)
# Interface names go inside quotes in the ruleset: allow only what cannot break out of them.
_IFNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")
NFT_TIMEOUT = 10.0


def _nft(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("nft")
    if binary is None:
        raise WeftError(_NFT_MISSING, ExitCode.MISSING_DEPENDENCY)
    return subprocess.run(
        [binary, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=NFT_TIMEOUT,
        check=False,
        # LC_ALL=C: check_nftables reads nft's (libc's) error text.
        env={**{k: v for k, v in os.environ.items() if k != "WEFT_SECRET"}, "LC_ALL": "C"},
    )


# A table nobody makes: looking it up is one small netlink request, and the kernel checks
# CAP_NET_ADMIN before it looks, so "no such table" proves nft may change the ruleset.
_PROBE_TABLE = "weft_probe_nftables_access"


def check_nftables() -> None:
    """Raise WeftError(MISSING_DEPENDENCY) unless `nft` exists and may change the ruleset."""
    try:
        result = _nft(["list", "table", "inet", _PROBE_TABLE])
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WeftError(f"{_NFT_MISSING} ({exc})", ExitCode.MISSING_DEPENDENCY) from exc
    if result.returncode != 0 and "No such file or directory" not in result.stderr:
        detail = result.stderr.strip() or f"exit status {result.returncode}"
        raise WeftError(f"{_NFT_MISSING} ({detail})", ExitCode.MISSING_DEPENDENCY)


def table_name(ifname: str) -> str:
    # nft identifiers allow letters, digits and underscores; map the rest of a link name.
    return "weft_" + re.sub(r"[^A-Za-z0-9_]", "_", ifname)


class _Isolation:
    def __init__(self, ifname: str) -> None:
        if not _IFNAME.match(ifname):
            raise ValueError(f"unsupported interface name for nftables: {ifname!r}")
        self.ifname = ifname
        self.table = table_name(ifname)
        self._created = False  # whether a load of ours made the table

    def _input_rules(self) -> list[str]:
        raise NotImplementedError

    def _ruleset(self, *, create: bool = False) -> str:
        """The table's text: made afresh (fails if it exists), or replacing whatever is there."""
        ifname = f'"{self.ifname}"'
        input_rules = "\n".join(f"    {rule}" for rule in self._input_rules())
        table = f"inet {self.table}"
        # Creating: `create` fails if the table exists. (It is a line of its own: nft 1.0 ignores
        # the block of a `create table X { ... }`, loading an empty table.) Replacing: the first
        # two lines make "delete" succeed whether or not the table existed.
        head = (
            f"create table {table}\ntable {table} {{"
            if create
            else f"table {table}\ndelete table {table}\ntable {table} {{"
        )
        return f"""{head}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname {ifname} ct state established,related accept
{input_rules}
    iifname {ifname} drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname {ifname} drop
    oifname {ifname} drop
  }}
}}
"""

    def _load(self) -> None:
        try:
            result = None
            if not self._created:
                # Fails, changing nothing, if a leftover table has this name: replaced below.
                result = _nft(["-f", "-"], stdin=self._ruleset(create=True))
            if result is None or result.returncode != 0:
                result = _nft(["-f", "-"], stdin=self._ruleset())
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise WeftError(f"cannot load nftables table {self.table}: {exc}") from exc
        if result.returncode != 0:
            raise WeftError(
                f"cannot load nftables table {self.table}: {result.stderr.strip()}",
                ExitCode.FAILURE,
            )
        self._created = True

    def close(self) -> None:
        """Delete the table; quiet if it is already gone (or nft itself is)."""
        self._created = False
        # "table X" first so the delete cannot fail on a missing table.
        with contextlib.suppress(OSError, subprocess.TimeoutExpired, WeftError):
            _nft(["-f", "-"], stdin=f"table inet {self.table}\ndelete table inet {self.table}\n")

    def __enter__(self) -> _Isolation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_table(ifname: str) -> None:
    """Delete the table of interface `ifname` if there is one (an interface left behind)."""
    _Isolation(ifname).close()


class ServerIsolation(_Isolation):
    """On the server host: peers reach nothing here (Weft only dials out), nor each other."""

    def _input_rules(self) -> list[str]:
        return []

    def apply(self) -> None:
        self._load()


class TunnelIsolation(_Isolation):
    """On the tunnel host: the server reaches only this tunnel's forwarder ports."""

    def __init__(self, ifname: str, server_address: str, local_address: str | None = None) -> None:
        super().__init__(ifname)
        addr = ip_address(server_address.split("/")[0])
        self._family = "ip6" if isinstance(addr, IPv6Address) else "ip"
        self.server_address = str(addr)
        # Only the tunnel's own WireGuard address: not the same port on the host's other ones.
        self.local_address = str(ip_address(local_address.split("/")[0])) if local_address else None
        self._tcp: frozenset[int] = frozenset()
        self._udp: frozenset[int] = frozenset()

    def _input_rules(self) -> list[str]:
        rules = []
        for proto, ports in (("tcp", self._tcp), ("udp", self._udp)):
            if ports:  # an empty set is a syntax error in nft
                port_set = ", ".join(str(p) for p in sorted(ports))
                daddr = f"{self._family} daddr {self.local_address} " if self.local_address else ""
                rules.append(
                    f'iifname "{self.ifname}" {self._family} saddr {self.server_address} '
                    f"{daddr}{proto} dport {{ {port_set} }} accept"
                )
        return rules

    def apply(self, tcp_ports: set[int], udp_ports: set[int]) -> None:
        """Allow exactly these ports from the server, replacing the previous set atomically."""
        for port in (*tcp_ports, *udp_ports):
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"invalid port {port!r}")
        self._tcp, self._udp = frozenset(tcp_ports), frozenset(udp_ports)
        self._load()
