"""The Weft benchmark: one command, every scenario against its baseline in the same run.

    sudo .venv/bin/python bench/run.py [--quick] [--only bulk,latency,...] [--json FILE]

Scenarios (ratios are Weft divided by the baseline; goals from issue 7):

  bulk      TCP iperf3, 1 and 8 streams, vs iperf3 over bare WireGuard       goal >= 0.95
  latency   TCP connect-to-first-byte p50 vs a socat chain over WireGuard   goal within 0.5 ms
  start     `weft tunnel` launched to first byte on the public port         goal median <= 1 s
  idle      10,000 idle TCP connections through one tunnel                  goal RSS <= 150 MB,
                                                                            new ones < 10 ms
  tunnels   200 tunnels from a few tunnel hosts on one server               goal p99 < 200 ms
  udp       bench/bench_udp.py (UDP iperf3 vs bare WireGuard)               goal >= 0.85
  http      bench/bench_http.py (wrk, 1 KiB, 50 connections, vs nginx)      goal >= 0.9 req/s,
                                                                            p99 <= 2x

Each scenario builds its own namespaces (tests/netns.py) with real wireguard-go and removes them
and every process it started when it ends, also on failure. `--quick` is a tiny setting that
only shows the harness works (figures from it mean little). Prints a table, then JSON. Never
fails on a timing: the exit code is 0 whenever every scenario produced its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bench_tcp import TcpSettings, log, run_tcp  # noqa: E402

TCP_SCENARIOS = ("bulk", "latency", "start", "idle", "tunnels")
ALL = (*TCP_SCENARIOS, "udp", "http")


def raise_fd_limit(wanted: int = 1 << 16) -> None:
    """Let the processes we start hold 10,000 relayed connections (two sockets each)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    new_hard = hard if hard == resource.RLIM_INFINITY else max(hard, wanted)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_hard, new_hard))
    except (OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- the other engineers' bench modules, run as they are --------------------------------------


def run_udp(quick: bool) -> dict[str, Any]:
    script = BENCH / "bench_udp.py"
    if not script.exists():
        return {"error": "bench/bench_udp.py is missing"}
    timing = ["--seconds", "1", "--rounds", "1"] if quick else ["--seconds", "4", "--rounds", "2"]
    args = [sys.executable, str(script), "--json", *timing]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    try:
        data: dict[str, Any] = json.loads(result.stdout[result.stdout.index("{") :])
    except ValueError:
        return {"error": f"bench_udp.py exited {result.returncode}: {result.stderr[-2000:]}"}
    return data


def _http_row(out: str, label: str) -> dict[str, float] | None:
    m = re.search(rf"{label}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out)
    if not m:
        return None
    rps, p50, p99, errors = map(float, m.groups())
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "non_2xx": errors}


def run_http(quick: bool) -> dict[str, Any]:
    script = BENCH / "bench_http.py"
    if not script.exists():
        return {"error": "bench/bench_http.py is missing"}
    args = [sys.executable, str(script), "--connections", "50"]
    args += ["--duration", "1", "--big-mib", "4"] if quick else ["--duration", "10"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    weft = _http_row(result.stdout, "weft virtual host")
    nginx = _http_row(result.stdout, "nginx reverse proxy")
    if weft is None or nginx is None:
        return {
            "error": f"bench_http.py exited {result.returncode}: "
            f"{(result.stdout + result.stderr)[-2000:]}"
        }
    big = re.search(
        r"weft virtual host (\d+), nginx reverse proxy (\d+), straight over "
        r"WireGuard from the server (\d+)",
        result.stdout,
    )
    answer: dict[str, Any] = {"weft": weft, "nginx": nginx}
    cpu = re.search(r"CPU per request \(user\+sys, median\): weft server ([\d.]+) us, "
                    r"nginx ([\d.]+) us", result.stdout)
    if cpu:
        answer["proxy_cpu_us"] = {"weft": float(cpu.group(1)), "nginx": float(cpu.group(2))}
    if big:
        answer["download_mbit_s"] = dict(
            zip(("weft", "nginx", "wireguard"), map(float, big.groups()), strict=True)
        )
    return answer


# --- the table --------------------------------------------------------------------------------


@attrs.define
class Row:
    scenario: str
    unit: str
    weft: float | None
    baseline: float | None
    against: str  # what `baseline` is: a measured alternative, or "goal"
    ratio: float | None
    goal: str
    met: bool | None

    def cells(self) -> list[str]:
        def num(x: float | None) -> str:
            if x is None:
                return "n/a"
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"

        met = {True: "yes", False: "NO", None: "-"}[self.met]
        ratio = "n/a" if self.ratio is None else f"{self.ratio:.2f}"
        return [
            self.scenario,
            self.unit,
            num(self.weft),
            num(self.baseline),
            self.against,
            ratio,
            self.goal,
            met,
        ]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    bulk = results.get("bulk")
    if bulk:
        for n in (1, 8):
            b = bulk[f"streams_{n}"]
            r = _ratio(b["weft_mbit_s"], b["bare_mbit_s"])
            out.append(
                Row(
                    f"TCP bulk, {n} stream{'s' * (n > 1)}",
                    "Mbit/s",
                    b["weft_mbit_s"],
                    b["bare_mbit_s"],
                    "bare WireGuard",
                    r,
                    ">= 0.95",
                    r is not None and r >= 0.95,
                )
            )
    lat = results.get("latency")
    if lat:
        w, s = lat["weft_p50_ms"], lat["socat_p50_ms"]
        out.append(
            Row(
                "TCP connect-to-first-byte p50",
                "ms",
                w,
                s,
                "socat chain",
                _ratio(w, s),
                f"<= +0.5 ms ({w - s:+.2f})",
                w - s <= 0.5,
            )
        )
    http = results.get("http")
    if http:
        if "error" in http:
            out.append(
                Row(
                    "HTTP 1 KiB, 50 conns",
                    "req/s",
                    None,
                    None,
                    "nginx",
                    None,
                    "error: see JSON",
                    None,
                )
            )
        else:
            w, n = http["weft"], http["nginx"]
            r = _ratio(w["rps"], n["rps"])
            out.append(
                Row(
                    "HTTP 1 KiB, 50 conns",
                    "req/s",
                    w["rps"],
                    n["rps"],
                    "nginx",
                    r,
                    ">= 0.9",
                    r is not None and r >= 0.9,
                )
            )
            r = _ratio(w["p99_ms"], n["p99_ms"])
            out.append(
                Row(
                    "HTTP 1 KiB, 50 conns p99",
                    "ms",
                    w["p99_ms"],
                    n["p99_ms"],
                    "nginx",
                    r,
                    "<= 2.0",
                    r is not None and r <= 2.0,
                )
            )
            cpu = http.get("proxy_cpu_us")
            if cpu:
                out.append(
                    Row(
                        "HTTP proxy CPU per request",
                        "us",
                        cpu["weft"],
                        cpu["nginx"],
                        "nginx",
                        _ratio(cpu["weft"], cpu["nginx"]),
                        "reported",
                        None,
                    )
                )
    udp = results.get("udp")
    if udp:
        if "error" in udp:
            out.append(
                Row(
                    "UDP throughput",
                    "Mbit/s",
                    None,
                    None,
                    "bare WireGuard",
                    None,
                    "error: see JSON",
                    None,
                )
            )
        else:
            # Ratios are bench_udp's own: Weft over the baseline within each round, median. The
            # goal's baseline is bare WireGuard from the server host; bare WireGuard with the
            # server's kernel forwarding a public port into it (the same hosts as Weft's path)
            # is reported beside it.
            w = udp["weft"]["throughput"].get("mbit_s")
            b = udp["bare"]["throughput"].get("mbit_s")
            f = udp["forwarded"]["throughput"].get("mbit_s")
            r = udp["ratios"]["throughput"]
            out.append(
                Row(
                    "UDP throughput, 1400 B",
                    "Mbit/s",
                    w,
                    b,
                    "bare WireGuard",
                    r,
                    ">= 0.85",
                    r is not None and r >= 0.85,
                )
            )
            out.append(
                Row(
                    "UDP throughput, 1400 B, vs WG + port forward",
                    "Mbit/s",
                    w,
                    f,
                    "WG + forward",
                    udp["ratios"]["throughput_vs_forwarded"],
                    "reported",
                    None,
                )
            )
            out.append(
                Row(
                    "UDP 64 B datagrams",
                    "pkt/s",
                    udp["weft"]["small"].get("pps"),
                    udp["bare"]["small"].get("pps"),
                    "bare WireGuard",
                    udp["ratios"]["small_pps"],
                    "reported",
                    None,
                )
            )
            fits = udp["bare"].get("fits", {}).get("mbit_s")
            if fits:  # datagrams that fit one WireGuard packet: the bare path's ceiling
                out.append(
                    Row(
                        "UDP 1400 B vs WG alone with 1364 B",
                        "Mbit/s",
                        w,
                        fits,
                        "WG, 1364 B",
                        udp["ratios"].get("throughput_vs_fits"),
                        "reported",
                        None,
                    )
                )
    start = results.get("start")
    if start:
        m = start["median_s"]
        out.append(Row("tunnel start, median", "s", m, 1.0, "goal", m / 1.0, "<= 1 s", m <= 1.0))
    idle = results.get("idle")
    if idle:
        n = idle["connections"]
        out.append(
            Row(
                f"{n} idle conns: weft RSS",
                "MB",
                idle["rss_mb"],
                150.0,
                "goal",
                idle["rss_mb"] / 150,
                "<= 150 MB",
                idle["rss_mb"] <= 150,
            )
        )
        if n < idle["wanted"]:
            est = idle["rss_at_wanted_mb"]
            out.append(
                Row(
                    f"{idle['wanted']} idle conns: RSS (extrapolated)",
                    "MB",
                    est,
                    150.0,
                    "goal",
                    est / 150,
                    "<= 150 MB",
                    est <= 150,
                )
            )
        out.append(
            Row(
                f"{n} idle conns: new conn p99",
                "ms",
                idle["new_p99_ms"],
                10.0,
                "goal",
                idle["new_p99_ms"] / 10,
                "< 10 ms",
                idle["new_p99_ms"] < 10,
            )
        )
    tun = results.get("tunnels")
    if tun:
        out.append(
            Row(
                f"{tun['tunnels']} tunnels: login-to-ready p99",
                "ms",
                tun["p99_ms"],
                200.0,
                "goal",
                tun["p99_ms"] / 200,
                "< 200 ms",
                tun["p99_ms"] < 200,
            )
        )
        out.append(
            Row(
                f"{tun['tunnels']} tunnels: server RSS",
                "MB",
                tun["server_rss_mb"],
                tun["server_rss_before_mb"],
                "no tunnels",
                _ratio(tun["server_rss_mb"], tun["server_rss_before_mb"]),
                "reported",
                None,
            )
        )
    return out


def table(all_rows: list[Row]) -> str:
    header = ["scenario", "unit", "weft", "baseline", "against", "ratio", "goal", "met"]
    cells = [header] + [r.cells() for r in all_rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    right = {2, 3, 5}
    return "\n".join(
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny setting (smoke test)")
    parser.add_argument("--only", default=",".join(ALL), help=f"comma list of {','.join(ALL)}")
    parser.add_argument("--repeat", type=int, help="runs per figure (median; default 3)")
    parser.add_argument("--seconds", type=float, help="seconds per iperf3 run (default 5)")
    parser.add_argument("--idle-connections", type=int, help="default 10000")
    parser.add_argument("--tunnels", type=int, help="default 200")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the JSON here")
    args = parser.parse_args(argv)
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    if unknown := set(only) - set(ALL):
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        print("bench/run.py needs root (network namespaces, WireGuard)", file=sys.stderr)
        return 2
    raise_fd_limit()
    tcp = tuple(s for s in only if s in TCP_SCENARIOS)
    settings = TcpSettings.quick(tcp) if args.quick else TcpSettings(scenarios=tcp)
    overrides = {
        k: v
        for k, v in (
            ("repeat", args.repeat),
            ("seconds", args.seconds),
            ("idle_connections", args.idle_connections),
            ("tunnels", args.tunnels),
        )
        if v is not None
    }
    settings = attrs.evolve(settings, **overrides)

    results: dict[str, Any] = {
        "load_before": load(),
        "quick": args.quick,
        # Weft's processes run on this interpreter; its build moves their Python time by ~25%
        # (docs/operations.md, "Which Python"), so the figures name it.
        "python": f"{platform.python_version()} ({os.path.realpath(sys.executable)})",
        "settings": attrs.asdict(settings),
    }
    started = time.monotonic()
    if tcp:
        log(f"TCP scenarios {', '.join(tcp)} (load {load()})")
        results.update(run_tcp(settings))
    if "udp" in only:
        log(f"UDP: bench/bench_udp.py (load {load()})")
        results["udp"] = run_udp(args.quick)
    if "http" in only:
        log(f"HTTP: bench/bench_http.py (load {load()})")
        results["http"] = run_http(args.quick)
    results["load_after"] = load()
    results["seconds"] = round(time.monotonic() - started, 1)
    all_rows = rows(results)
    results["rows"] = [attrs.asdict(r) for r in all_rows]
    print(
        f"Weft benchmark{' (--quick: tiny setting, figures are not meaningful)' * args.quick}; "
        f"load average {results['load_before']} before, {results['load_after']} after; "
        f"{results['seconds']} s; Python {results['python']}"
    )
    print(table(all_rows))
    text = json.dumps(results)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
