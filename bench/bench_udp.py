"""UDP through Weft against bare WireGuard between the same namespaces, in the same run.

    sudo .venv/bin/python bench/bench_udp.py [--seconds 4] [--rounds 2] [--reverse] [--json]
    .venv/bin/python bench/bench_udp.py --cpu [--count 300000] [--size 1400]

Builds its own namespace lab (tests/netns.py) and measures with iperf3 -u over three paths to
the tunnel host, all set up at once and measured in turns (rate by rate, the order reversed every
other round):

- bare:      the goal's baseline: a wireguard-go pair between the server host and the tunnel
             host (tests/e2e/wg_node.py), iperf3 client on the server host, server on the
             tunnel host's WireGuard address;
- weft:      `weft server` and `weft tunnel` (a udp:// route for the data, a tcp:// route for
             iperf3's control connection): iperf3 client on the visitor host, server on the
             tunnel host's loopback;
- forwarded: reported beside them: the same wireguard-go pair and the same two ends as Weft's
             path, built by hand: the server's kernel forwards a public port (on an address of
             its own) into the pair (nftables DNAT + masquerade); iperf3 client on the visitor
             host. Weft / forwarded is what Weft costs against publishing the port without it;
             forwarded / bare is what the visitor's hop costs any way of publishing a port.

Two figures each: throughput with 1,400-byte datagrams (what arrived, in Mbit/s) and packets per
second with 64-byte datagrams. Each is measured at a few offered rates and the best delivery is
kept (UDP has no flow control: offering far more than a path carries only burns the CPU it
shares), then the median over rounds; ratios are Weft's over a baseline within each round (the
median and the minimum are printed). Also reported: bare WireGuard with 1,364-byte datagrams,
which fit one of its packets (a 1,400-byte one is two IP fragments inside WireGuard, where Weft
packs datagrams into frames that fill its packets): bare WireGuard's ceiling in this lab. Prints
figures and ratios, and JSON with --json. Never asserts a timing.

`--cpu` (no root, loopback only) measures what the forwarder itself costs: a `UdpForwarder` in its
own process relays COUNT datagrams from a blaster (this process) to a sink (another process), and
the forwarder's utime+stime from /proc is divided by the datagrams the sink got. CPU time is far
steadier than throughput on a shared machine. `--rate` paces the blaster (datagrams per second, in
bursts of `--burst`), `--visitors` spreads the datagrams over that many source sockets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from bench_tcp import WgNode, process_times  # noqa: E402  (bare WireGuard baseline, shared)

from netns import Host, Lab, wait_tcp_port  # noqa: E402
from weft_core.wireguard import generate_private_key, public_key  # noqa: E402
from weftlab import SERVER_IP, start_server, start_tunnel  # noqa: E402

BARE_SERVER, BARE_TUNNEL = "10.9.0.1", "10.9.0.2"
BARE_WG_PORT = 9193
IPERF_PORT = 5201
PUBLIC_PORT = 15201
# The server's kernel forwards FORWARD_IP:FORWARD_PORT into bare WireGuard (forward_port). A
# second address of the server's, so that the path MTU the visitor learns for it (1,420, from
# the forward into WireGuard) is not applied to its datagrams to Weft's SERVER_IP as well.
FORWARD_IP, FORWARD_PORT = "198.51.100.3", 15202
# bare: the server host itself -> bare WireGuard -> tunnel host (the goal's baseline);
# weft: visitor -> Weft -> tunnel host; forwarded: visitor -> the server's kernel -> bare
# WireGuard -> tunnel host (the same hosts as Weft's path, the hand-built way; reported).
PATHS = ("weft", "forwarded", "bare")

# Offered rates (iperf3 -b); 0 means as fast as the sender can go.
# The rates around where the paths saturate on a 2-core machine (150-250 Mbit/s) are closer
# together: past it, every path delivers less (the CPU the senders burn is taken from WireGuard).
THROUGHPUT_RATES = ("100M", "150M", "200M", "250M", "300M", "375M", "450M")
PPS_RATES = ("5M", "10M", "15M", "25M", "40M")  # 15M is 29k packets/s: every path reaches it
# Reported beside the goal: what bare WireGuard carries of datagrams that fit one of its packets
# (1,364 + 28 bytes of headers <= its MTU, 1,420). A 1,400-byte datagram does not fit: sent as
# it is, it is two IP fragments, two WireGuard packets, while Weft packs datagrams into frames
# that fill the packets (weft_udp.frames). This row shows that ceiling for the bare path.
FITS_LENGTH = 1364


def bare_wireguard(lab: Lab) -> tuple[WgNode, WgNode]:
    server_key, tunnel_key = generate_private_key(), generate_private_key()
    server, tunnel = WgNode(lab.server), WgNode(lab.tunnel)
    server("create", prefix="bwgs", key=server_key, address=f"{BARE_SERVER}/24",
           listen_port=BARE_WG_PORT)
    tunnel("create", prefix="bwgt", key=tunnel_key, address=f"{BARE_TUNNEL}/24", listen_port=None)
    server("set_peer", public_key=public_key(tunnel_key), allowed_ips=[f"{BARE_TUNNEL}/32"])
    tunnel("set_peer", public_key=public_key(server_key), allowed_ips=[f"{BARE_SERVER}/32"],
           endpoint=f"{SERVER_IP}:{BARE_WG_PORT}", persistent_keepalive=1)
    deadline = time.monotonic() + 15
    while not any(p["handshake"] for p in tunnel("peers")):
        if time.monotonic() > deadline:
            raise RuntimeError("no handshake between the bare WireGuard pair")
        time.sleep(0.05)
    return server, tunnel


def iperf(
    client: Host, host: str, port: int, seconds: float, length: int, rate: str,
    reverse: bool = False,
) -> dict[str, float]:
    args = ["iperf3", "-c", host, "-p", str(port), "-u", "-b", rate, "-l", str(length),
            "-t", str(seconds), "-J", *(["-R"] if reverse else [])]
    result = client.run(args, timeout=seconds + 30)
    data = json.loads(result.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3 {' '.join(args)}: {data['error']}")
    received = data["end"]["sum_received"]
    sent = data["end"]["sum_sent"]
    arrived = received["packets"] - received["lost_packets"]
    secs = received["seconds"] or seconds
    return {
        "mbit_s": received["bytes"] * 8 / secs / 1e6,
        "pps": arrived / secs,
        "offered_mbit_s": sent["bits_per_second"] / 1e6,
        "lost_percent": received["lost_percent"],
        "packets": arrived,
    }


def run_once(client: Host, host: str, port: int, seconds: float, length: int, rate: str,
             pids: dict[str, int] | None, reverse: bool = False) -> dict[str, Any]:
    """One iperf3 run; with `pids`, the CPU each of those processes spent per datagram that
    arrived. An overloaded run can fail once ("unable to read from stream socket"): it is run
    again, and a second failure is kept as {"error": ...} (the other rates still count)."""
    figures: dict[str, Any] = {}
    for attempt in (1, 2):
        before = {name: _cpu(pid) for name, pid in (pids or {}).items()}
        try:
            figures = iperf(client, host, port, seconds, length, rate, reverse)
            break
        except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
            figures = {"error": str(exc), "attempts": attempt}
    if "error" not in figures:
        packets = max(1, figures["packets"])
        for name, pid in (pids or {}).items():
            after = _cpu(pid)
            user = (after[0] - before[name][0]) * 1e6 / packets
            system = (after[1] - before[name][1]) * 1e6 / packets
            figures[f"{name}_cpu_us"] = round(user + system, 2)
            figures[f"{name}_user_sys_us"] = (round(user, 2), round(system, 2))
            figures[f"{name}_per_wakeup"] = round(
                packets / max(1, after[2] - before[name][2]), 1)
    print(f"  {host}:{port} {length} B at {rate}: {figures}", file=sys.stderr)
    return figures


# --- loopback CPU micro-bench (--cpu) -------------------------------------------------------

LO = "127.0.0.1"


def _role_sink(echo: int) -> None:
    """Count datagrams (and send each back `echo` times); print `count bytes` when quiet."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((LO, 0))
    print(sock.getsockname()[1], flush=True)
    buf = bytearray(65535)
    view = memoryview(buf)
    count = nbytes = 0
    reported = 0
    sock.settimeout(0.3)
    while True:
        try:
            n, peer = sock.recvfrom_into(buf)
        except TimeoutError:
            if count != reported:
                print(count, nbytes, flush=True)
                reported = count
            continue
        count += 1
        nbytes += n
        for _ in range(echo):
            with contextlib.suppress(OSError):
                sock.sendto(view[:n], peer)


def _role_forwarder(target: int, coalesce_ms: float | None) -> None:
    import asyncio

    import weft_udp.forwarder as module
    from weft_core import HOST_NET
    from weft_udp.forwarder import UdpForwarder

    if coalesce_ms is not None:
        module.coalesce_delay = coalesce_ms / 1000

    async def run() -> None:
        fwd = UdpForwarder("bench", HOST_NET.bind_udp(LO, 0), HOST_NET, (LO, target))
        await fwd.start()
        print(fwd.address[1], flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        c = fwd.counters
        print(json.dumps({"in": c.datagrams_in, "out": c.datagrams_out, "dropped": c.dropped,
                          "gso_sends": getattr(fwd, "gso_sends", None)}), flush=True)
        await fwd.close()

    try:  # the loop weft itself runs on (uvloop when installed)
        from weft_core.loop import run as run_loop
    except ImportError:
        run_loop = asyncio.run
    run_loop(run())


def _cpu(pid: int) -> tuple[float, float, int]:
    """utime, stime (seconds) and voluntary context switches of a process."""
    user, system = process_times(pid)
    switches = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            switches = int(line.split()[1])
    return user, system, switches


def _blast(port: int, count: int, size: int, rate: float, burst: int, visitors: int) -> None:
    socks = []
    for _ in range(visitors):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.connect((LO, port))
        socks.append(sock)
    payload = os.urandom(size)
    start = time.monotonic()
    sent = 0
    while sent < count:
        for i in range(min(burst, count - sent)):
            sock = socks[(sent + i) % visitors]
            with contextlib.suppress(OSError):
                sock.send(payload)
        sent += min(burst, count - sent)
        if rate:
            delay = start + sent / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    for sock in socks:
        sock.close()


def cpu_bench(args: argparse.Namespace) -> dict[str, Any]:
    me = [sys.executable, str(Path(__file__).resolve())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(REPO / "plugins" / "weft_udp"), os.environ.get("PYTHONPATH", "")])}
    sink = subprocess.Popen([*me, "--role", "sink", "--echo", str(args.echo)],
                            stdout=subprocess.PIPE, text=True, env=env)
    fwd = None
    try:
        assert sink.stdout is not None
        sink_port = int(sink.stdout.readline())
        coalesce = [] if args.coalesce_ms is None else ["--coalesce-ms", str(args.coalesce_ms)]
        fwd = subprocess.Popen(
            [*me, "--role", "forwarder", "--target", str(sink_port), *coalesce],
            stdout=subprocess.PIPE, text=True, env=env)
        assert fwd.stdout is not None
        fwd_port = int(fwd.stdout.readline())
        _blast(fwd_port, 2000, args.size, 50_000, 10, args.visitors)  # warm up, open sessions
        got0 = int(sink.stdout.readline().split()[0])
        user0, sys0, sw0 = _cpu(fwd.pid)
        t0 = time.monotonic()
        _blast(fwd_port, args.count, args.size, args.rate, args.burst, args.visitors)
        got1 = int(sink.stdout.readline().split()[0])
        user1, sys1, sw1 = _cpu(fwd.pid)
        elapsed = time.monotonic() - t0 - 0.3  # the sink's quiet spell
        fwd.send_signal(signal.SIGTERM)
        counters = json.loads(fwd.stdout.readline())
        fwd.wait(10)
    finally:
        for proc in (fwd, sink):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    forwarded = got1 - got0
    user, system = (user1 - user0) * 1e6 / forwarded, (sys1 - sys0) * 1e6 / forwarded
    return {
        "count": args.count, "size": args.size, "rate": args.rate, "visitors": args.visitors,
        "forwarded": forwarded, "lost_percent": 100 * (1 - forwarded / args.count),
        "us_per_datagram": user + system, "user_us": user, "sys_us": system,
        "datagrams_per_wakeup": forwarded / max(1, sw1 - sw0),
        "seconds": elapsed, "counters": counters,
        "loadavg": os.getloadavg()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per iperf3 run (default 4)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--reverse", action="store_true",
                        help="the other way: the service on the tunnel host sends, the visitor "
                        "receives (iperf3 -R; Weft's replies)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds over every rate and path; medians are reported (default 2)")
    parser.add_argument("--cpu", action="store_true",
                        help="loopback micro-bench: forwarder CPU per datagram (no root)")
    parser.add_argument("--count", type=int, default=300_000, help="--cpu: datagrams")
    parser.add_argument("--size", type=int, default=1400, help="--cpu: datagram size")
    parser.add_argument("--rate", type=float, default=0, help="--cpu: datagrams/s (0: flat out)")
    parser.add_argument("--burst", type=int, default=16, help="--cpu: datagrams per burst")
    parser.add_argument("--visitors", type=int, default=1, help="--cpu: source sockets")
    parser.add_argument("--runs", type=int, default=3, help="--cpu: runs (median kept)")
    parser.add_argument("--echo", type=int, default=0, metavar="K",
                        help="--cpu: the sink sends every datagram back K times (replies cross "
                        "too; CPU is then per datagram in, with its K replies)")
    parser.add_argument("--coalesce-ms", type=float,
                        help="weft's --udp-coalesce-ms (default: weft's own); WEFT_UDP_GSO=0 in "
                        "the environment turns GSO off, to compare")
    parser.add_argument("--role", choices=("sink", "forwarder"), help=argparse.SUPPRESS)
    parser.add_argument("--target", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "sink":
        _role_sink(args.echo)
        return 0
    if args.role == "forwarder":
        _role_forwarder(args.target, args.coalesce_ms)
        return 0
    if args.cpu:
        runs = [cpu_bench(args) for _ in range(args.runs)]
        for run in runs:
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                              for k, v in run.items()}), file=sys.stderr)
        median = sorted(runs, key=lambda r: r["us_per_datagram"])[len(runs) // 2]
        print(f"forwarder CPU per datagram ({args.size} B, {args.visitors} visitor(s), "
              f"{f'echoed x{args.echo}, ' if args.echo else ''}rate "
              f"{args.rate or 'flat out'}): median {median['us_per_datagram']:.2f} us "
              f"(user {median['user_us']:.2f}, sys {median['sys_us']:.2f}), "
              f"{median['datagrams_per_wakeup']:.1f} datagrams per wake-up, "
              f"lost {median['lost_percent']:.1f}%, load {median['loadavg']:.2f}")
        if args.json:
            print(json.dumps(runs))
        return 0
    if os.geteuid() != 0:
        print("bench_udp.py needs root (network namespaces)", file=sys.stderr)
        return 2

    results: dict[str, Any] = {"loadavg_before": os.getloadavg(), "rounds": args.rounds,
                               "seconds": args.seconds, "reverse": args.reverse}
    with Lab() as lab:
        # Everything is set up first and stays up: the paths are measured in turns, rate by
        # rate, so a load that comes and goes on a shared machine hits all of them alike.
        nodes = bare_wireguard(lab)
        try:
            lab.tunnel.popen(["iperf3", "-s", "-B", BARE_TUNNEL, "-p", str(IPERF_PORT)],
                             name="iperf3-bare")
            wait_tcp_port(lab.server, BARE_TUNNEL, IPERF_PORT)
            forward_port(lab)
            flags = [] if args.coalesce_ms is None else ["--udp-coalesce-ms", str(args.coalesce_ms)]
            server = start_server(lab, "--allow-ports", "1024-65535", *flags)
            lab.tunnel.popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF_PORT)],
                             name="iperf3-weft")
            tunnel = start_tunnel(
                lab, server.url(),
                f"tcp://127.0.0.1:{IPERF_PORT}", f"tcp://:{PUBLIC_PORT}",  # iperf3's control
                f"udp://127.0.0.1:{IPERF_PORT}", f"udp://:{PUBLIC_PORT}",  # the measured data
                *flags,
            )
            # No probe connection to Weft's port: iperf3 -s would take it for a test and reset
            # the next one.
            wait_tcp_port(lab.visitor, FORWARD_IP, FORWARD_PORT)
            targets = {
                "weft": (lab.visitor, SERVER_IP, PUBLIC_PORT,
                         {"server": server.proc.pid, "tunnel": tunnel.pid}),
                "forwarded": (lab.visitor, FORWARD_IP, FORWARD_PORT, None),
                "bare": (lab.server, BARE_TUNNEL, IPERF_PORT, None),
            }
            for kind, length, rates, key in (("throughput", 1400, THROUGHPUT_RATES, "mbit_s"),
                                              ("small", 64, PPS_RATES, "pps")):
                rounds = [measure_round(targets, args.seconds, length, rates, key, i,
                                        reverse=args.reverse)
                          for i in range(args.rounds)]
                for path in PATHS:
                    results.setdefault(path, {})[kind] = median_of_rounds(
                        [r[path] for r in rounds], key)
                results.setdefault("paired", {})[kind] = paired_ratios(rounds, key)
            fits = [measure_round(targets, args.seconds, FITS_LENGTH, THROUGHPUT_RATES,
                                  "mbit_s", i, paths=("bare",), reverse=args.reverse)
                    for i in range(args.rounds)]
            results["bare"]["fits"] = median_of_rounds([r["bare"] for r in fits], "mbit_s")
            # Shows any path MTU the visitor learned for Weft's address ("mtu 1420" in its cache
            # would mean its datagrams to Weft were fragmented before they left it).
            results["visitor_route_to_weft"] = " ".join(
                lab.visitor.check(["ip", "route", "get", SERVER_IP]).split())
        finally:
            for node in nodes:
                node.stop()

    results["loadavg_after"] = os.getloadavg()
    results["ratios"] = ratios(results)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print_table(results, args)
    print(json.dumps(results))
    return 0


def forward_port(lab: Lab) -> None:
    """The hand-built way to publish the tunnel host's port over bare WireGuard: the server's
    kernel forwards its public FORWARD_PORT (UDP, and TCP for iperf3's control connection) into
    the WireGuard link (DNAT), masquerading as its WireGuard address (the tunnel's peer only
    accepts that source). Lives in the lab's server namespace and goes with it."""
    lab.server.check(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    lab.server.check(["ip", "address", "add", f"{FORWARD_IP}/24", "dev", "eth0"])
    dnat = f"dnat to {BARE_TUNNEL}:{IPERF_PORT}"
    lab.server.check(["nft", "-f", "-"], input=(
        "table ip weft_bench_forward {\n"
        "  chain pre {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        f"    ip daddr {FORWARD_IP} udp dport {FORWARD_PORT} {dnat}\n"
        f"    ip daddr {FORWARD_IP} tcp dport {FORWARD_PORT} {dnat}\n"
        "  }\n"
        "  chain post {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    ip daddr {BARE_TUNNEL} masquerade\n"
        "  }\n"
        "}\n"))


def measure_round(targets: dict[str, Any], seconds: float, length: int, rates: tuple[str, ...],
                  key: str, index: int, paths: tuple[str, ...] = PATHS,
                  reverse: bool = False) -> dict[str, dict[str, Any]]:
    """One round: every offered rate through every path, the paths in turn at each rate (their
    order reversed every other round); each path's best delivery over the rates."""
    order = list(paths) if index % 2 == 0 else list(reversed(paths))
    runs: dict[str, dict[str, Any]] = {path: {} for path in paths}
    for rate in rates:
        for path in order:
            client, host, port, pids = targets[path]
            runs[path][rate] = run_once(client, host, port, seconds, length, rate, pids,
                                        reverse)
    best: dict[str, dict[str, Any]] = {}
    for path in paths:
        good = {r: f for r, f in runs[path].items() if "error" not in f}
        if not good:
            best[path] = {"error": f"every iperf3 run failed: {runs[path]}"}
            continue
        rate, figures = max(good.items(), key=lambda item: item[1][key])
        best[path] = {**figures, "rate": rate, "runs": runs[path]}
    return best


def median_of_rounds(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """A path's figures: the median of its rounds' best deliveries (`key`), beside the round
    closest to it (with that round's rate, loss and CPU) and every round's figure."""
    good = [r for r in rounds if "error" not in r]
    if not good:
        return {"error": rounds[0]["error"]}
    middle = statistics.median(r[key] for r in good)
    closest = min(good, key=lambda r: abs(r[key] - middle))
    return {**closest, key: middle, "rounds": [r.get(key) for r in rounds]}


def paired_ratios(rounds: list[dict[str, dict[str, Any]]], key: str) -> dict[str, Any]:
    """Weft over each baseline within each round (measured in turns, seconds apart), with
    their median and minimum: the ratios that count."""
    out: dict[str, Any] = {}
    for baseline in ("bare", "forwarded"):
        values = [r["weft"][key] / r[baseline][key] for r in rounds
                  if key in r["weft"] and r[baseline].get(key)]
        out[baseline] = {"rounds": values,
                         "median": statistics.median(values) if values else None,
                         "min": min(values) if values else None}
    return out


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    paired = results["paired"]
    return {
        "throughput": paired["throughput"]["bare"]["median"],
        "throughput_min": paired["throughput"]["bare"]["min"],
        "small_pps": paired["small"]["bare"]["median"],
        "throughput_vs_forwarded": paired["throughput"]["forwarded"]["median"],
        "throughput_vs_forwarded_min": paired["throughput"]["forwarded"]["min"],
        "small_pps_vs_forwarded": paired["small"]["forwarded"]["median"],
        "throughput_vs_fits": (results["weft"]["throughput"].get("mbit_s", 0)
                               / results["bare"]["fits"]["mbit_s"]
                               if results["bare"].get("fits", {}).get("mbit_s") else None),
    }


def print_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    def cell(path: str, kind: str, key: str) -> str:
        figures = results[path][kind]
        return f"{figures[key]:>12.0f}" if key in figures else f"{'failed':>12}"

    def pct(value: float | None) -> str:
        return f"{value:>10.0%}" if value is not None else f"{'-':>10}"

    def loss(path: str) -> str:
        figures = results[path]["throughput"]
        return f"{figures['lost_percent']:>11.1f}%" if "lost_percent" in figures else f"{'-':>12}"

    r = results["ratios"]
    print(f"UDP, iperf3 -u{' -R (the service sends)' if args.reverse else ''}, best of "
          f"offered rates, median of {args.rounds} round(s) of "
          f"{args.seconds:g} s runs; ratios: median of the rounds' own")
    print(f"{'':28} {'WG alone':>12} {'WG+forward':>12} {'Weft':>12} "
          f"{'Weft/WG':>10} {'Weft/fwd':>10}")
    print(f"{'throughput, 1400 B (Mbit/s)':28} {cell('bare', 'throughput', 'mbit_s')} "
          f"{cell('forwarded', 'throughput', 'mbit_s')} {cell('weft', 'throughput', 'mbit_s')} "
          f"{pct(r['throughput'])} {pct(r['throughput_vs_forwarded'])}")
    print(f"{'small, 64 B (packets/s)':28} {cell('bare', 'small', 'pps')} "
          f"{cell('forwarded', 'small', 'pps')} {cell('weft', 'small', 'pps')} "
          f"{pct(r['small_pps'])} {pct(r['small_pps_vs_forwarded'])}")
    print(f"{'  loss at best rate':28} {loss('bare')} {loss('forwarded')} {loss('weft')}")
    print(f"{f'WG alone, {FITS_LENGTH} B (Mbit/s)':28} {cell('bare', 'fits', 'mbit_s')}"
          f"{'':27} {pct(r['throughput_vs_fits'])}   (datagrams that fit one WireGuard "
          f"packet: bare WireGuard's ceiling; reported)")
    print("WG alone: iperf3 on the server host over bare WireGuard to the tunnel host (the goal's "
          "baseline, >= 85%); WG+forward: from the visitor host, the server's kernel forwarding "
          "a public port into the same WireGuard (the same hosts as Weft's path, built by hand).")
    paired = results["paired"]["throughput"]
    for path in PATHS:
        rounds = results[path]["throughput"].get("rounds", [])
        print(f"  {path:10} 1400 B best per round (Mbit/s): "
              + ", ".join(f"{x:.0f}" if x is not None else "failed" for x in rounds))
    for baseline, label in (("bare", "Weft/WG"), ("forwarded", "Weft/fwd")):
        print(f"  {label} per round: " + ", ".join(f"{x:.2f}" for x in paired[baseline]["rounds"])
              + (f" (min {paired[baseline]['min']:.2f})" if paired[baseline]["min"] else ""))
    top = results["weft"]["throughput"]
    print(f"weft CPU per datagram at the best rate: server {top.get('server_cpu_us')} us "
          f"({top.get('server_per_wakeup')} per wake-up), tunnel {top.get('tunnel_cpu_us')} us "
          f"({top.get('tunnel_per_wakeup')} per wake-up); load average "
          f"{results['loadavg_before'][0]:.2f} before, {results['loadavg_after'][0]:.2f} after")
    print(f"visitor's route to Weft's address at the end: {results['visitor_route_to_weft']}")


if __name__ == "__main__":
    sys.exit(main())
