"""UDP through Weft against bare WireGuard between the same namespaces, in the same run.

    sudo /opt/weft-venv/bin/python bench/bench_udp.py [--seconds 5] [--json]
    /opt/weft-venv/bin/python bench/bench_udp.py --cpu [--count 300000] [--size 1400]

Builds its own namespace lab (tests/netns.py) and measures with iperf3 -u:

- bare:  a wireguard-go pair between the server host and the tunnel host (tests/e2e/wg_node.py),
         iperf3 client on the server host, iperf3 server on the tunnel host's WireGuard address;
- weft:  `weft server` and `weft tunnel` (a udp:// route for the data, a tcp:// route for
         iperf3's control connection), iperf3 client on the visitor host, server on the tunnel
         host's loopback.

Two figures each: throughput with 1,400-byte datagrams (what arrived, in Mbit/s) and packets per
second with 64-byte datagrams. Each is measured at a few offered rates and the best delivery is
kept (UDP has no flow control: offering far more than a path carries only burns the CPU it
shares). Prints figures and ratios, and JSON with --json. Never asserts a timing.

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

# Offered rates (iperf3 -b); 0 means as fast as the sender can go.
THROUGHPUT_RATES = ("100M", "200M", "300M", "450M")
PPS_RATES = ("5M", "10M", "15M", "25M")  # 15M is 29k packets/s: both paths reached it


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
    client: Host, host: str, port: int, seconds: float, length: int, rate: str
) -> dict[str, float]:
    args = ["iperf3", "-c", host, "-p", str(port), "-u", "-b", rate, "-l", str(length),
            "-t", str(seconds), "-J"]
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


def best(client: Host, host: str, port: int, seconds: float, length: int,
         rates: tuple[str, ...], key: str, pids: dict[str, int] | None = None) -> dict[str, Any]:
    """The best of iperf3 runs at `rates`; with `pids`, each run's CPU per datagram in those."""
    runs: dict[str, Any] = {}
    for rate in rates:
        # An overloaded run can fail once ("unable to read from stream socket"): run it again,
        # and if it fails twice keep the other rates' figures.
        for attempt in (1, 2):
            before = {name: _cpu(pid) for name, pid in (pids or {}).items()}
            try:
                runs[rate] = iperf(client, host, port, seconds, length, rate)
                break
            except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
                runs[rate] = {"error": str(exc), "attempts": attempt}
        if "error" not in runs[rate]:
            packets = max(1, runs[rate]["packets"])
            for name, pid in (pids or {}).items():
                after = _cpu(pid)
                user = (after[0] - before[name][0]) * 1e6 / packets
                system = (after[1] - before[name][1]) * 1e6 / packets
                runs[rate][f"{name}_cpu_us"] = round(user + system, 2)
                runs[rate][f"{name}_user_sys_us"] = (round(user, 2), round(system, 2))
                runs[rate][f"{name}_per_wakeup"] = round(
                    packets / max(1, after[2] - before[name][2]), 1)
        print(f"  {host}:{port} {length} B at {rate}: {runs[rate]}", file=sys.stderr)
    good = {r: f for r, f in runs.items() if "error" not in f}
    if not good:
        raise RuntimeError(f"every iperf3 run failed: {runs}")
    rate, figures = max(good.items(), key=lambda item: item[1][key])
    return {**figures, "rate": rate, "runs": runs}


def best_or_error(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """`best`, or {"error": ...} when every run failed: the other figures are still reported."""
    try:
        return best(*args, **kwargs)
    except RuntimeError as exc:
        return {"error": str(exc)}


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

    results: dict[str, Any] = {"loadavg_before": os.getloadavg()}
    with Lab() as lab:
        # Bare WireGuard between the server host and the tunnel host.
        nodes = bare_wireguard(lab)
        try:
            lab.tunnel.popen(["iperf3", "-s", "-B", BARE_TUNNEL, "-p", str(IPERF_PORT)],
                             name="iperf3-bare")
            wait_tcp_port(lab.server, BARE_TUNNEL, IPERF_PORT)
            results["bare"] = {
                "throughput": best(lab.server, BARE_TUNNEL, IPERF_PORT, args.seconds, 1400,
                                   THROUGHPUT_RATES, "mbit_s"),
                "small": best_or_error(lab.server, BARE_TUNNEL, IPERF_PORT, args.seconds, 64,
                                       PPS_RATES, "pps"),
            }
        finally:
            for node in nodes:
                node.stop()

        # Weft: visitor -> server -> WireGuard -> tunnel -> iperf3 on loopback.
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
        # No probe connection here: iperf3 -s would take it for a test and reset the next one.
        pids = {"server": server.proc.pid, "tunnel": tunnel.pid}  # CPU per datagram in each
        results["weft"] = {
            "throughput": best(lab.visitor, SERVER_IP, PUBLIC_PORT, args.seconds, 1400,
                               THROUGHPUT_RATES, "mbit_s", pids),
            "small": best_or_error(lab.visitor, SERVER_IP, PUBLIC_PORT, args.seconds, 64,
                                   PPS_RATES, "pps", pids),
        }

    results["loadavg_after"] = os.getloadavg()
    bare, weft = results["bare"], results["weft"]
    results["ratios"] = {
        "throughput": weft["throughput"]["mbit_s"] / bare["throughput"]["mbit_s"],
        "small_pps": (weft["small"]["pps"] / bare["small"]["pps"]
                      if "pps" in weft["small"] and "pps" in bare["small"] else None),
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"UDP, {args.seconds:g} s per run, best of offered rates (iperf3 -u)")
    print(f"{'':28} {'bare WireGuard':>16} {'through Weft':>16} {'ratio':>8}")
    print(f"{'throughput, 1400 B (Mbit/s)':28} {bare['throughput']['mbit_s']:>16.0f} "
          f"{weft['throughput']['mbit_s']:>16.0f} {results['ratios']['throughput']:>8.0%}")
    if results["ratios"]["small_pps"] is not None:
        print(f"{'small, 64 B (packets/s)':28} {bare['small']['pps']:>16.0f} "
              f"{weft['small']['pps']:>16.0f} {results['ratios']['small_pps']:>8.0%}")
    else:
        print(f"{'small, 64 B (packets/s)':28} every run failed: see the JSON")
    print(f"{'  loss at best rate':28} {bare['throughput']['lost_percent']:>15.1f}% "
          f"{weft['throughput']['lost_percent']:>15.1f}%")
    top = weft["throughput"]
    print(f"weft CPU per datagram at the best rate: server {top.get('server_cpu_us')} us "
          f"({top.get('server_per_wakeup')} per wake-up), tunnel {top.get('tunnel_cpu_us')} us "
          f"({top.get('tunnel_per_wakeup')} per wake-up); load average "
          f"{results['loadavg_before'][0]:.2f} before, {results['loadavg_after'][0]:.2f} after")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
