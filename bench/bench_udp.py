"""UDP through Weft against bare WireGuard between the same namespaces, in the same run.

    sudo /opt/weft-venv/bin/python bench/bench_udp.py [--seconds 5] [--json]

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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from bench_tcp import WgNode  # noqa: E402  (the bare WireGuard baseline, shared)

from netns import Host, Lab, wait_tcp_port  # noqa: E402
from weft_core.wireguard import generate_private_key, public_key  # noqa: E402
from weftlab import SERVER_IP, start_server, start_tunnel  # noqa: E402

BARE_SERVER, BARE_TUNNEL = "10.9.0.1", "10.9.0.2"
BARE_WG_PORT = 9193
IPERF_PORT = 5201
PUBLIC_PORT = 15201

# Offered rates (iperf3 -b); 0 means as fast as the sender can go.
THROUGHPUT_RATES = ("100M", "200M", "300M", "450M")
PPS_RATES = ("5M", "10M", "15M")


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
    }


def best(client: Host, host: str, port: int, seconds: float, length: int,
         rates: tuple[str, ...], key: str) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for rate in rates:
        try:
            runs[rate] = iperf(client, host, port, seconds, length, rate)
        except (RuntimeError, ValueError, KeyError) as exc:  # one overloaded run: keep the rest
            runs[rate] = {"error": str(exc)}
        print(f"  {host}:{port} {length} B at {rate}: {runs[rate]}", file=sys.stderr)
    good = {r: f for r, f in runs.items() if "error" not in f}
    if not good:
        raise RuntimeError(f"every iperf3 run failed: {runs}")
    rate, figures = max(good.items(), key=lambda item: item[1][key])
    return {**figures, "rate": rate, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per iperf3 run (default 4)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_udp.py needs root (network namespaces)", file=sys.stderr)
        return 2

    results: dict[str, Any] = {}
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
                "small": best(lab.server, BARE_TUNNEL, IPERF_PORT, args.seconds, 64,
                              PPS_RATES, "pps"),
            }
        finally:
            for node in nodes:
                node.stop()

        # Weft: visitor -> server -> WireGuard -> tunnel -> iperf3 on loopback.
        server = start_server(lab, "--allow-ports", "1024-65535")
        lab.tunnel.popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF_PORT)],
                         name="iperf3-weft")
        start_tunnel(
            lab, server.url(),
            f"tcp://127.0.0.1:{IPERF_PORT}", f"tcp://:{PUBLIC_PORT}",  # iperf3's control
            f"udp://127.0.0.1:{IPERF_PORT}", f"udp://:{PUBLIC_PORT}",  # the measured data
        )
        # No probe connection here: iperf3 -s would take it for a test and reset the next one.
        results["weft"] = {
            "throughput": best(lab.visitor, SERVER_IP, PUBLIC_PORT, args.seconds, 1400,
                               THROUGHPUT_RATES, "mbit_s"),
            "small": best(lab.visitor, SERVER_IP, PUBLIC_PORT, args.seconds, 64,
                          PPS_RATES, "pps"),
        }

    bare, weft = results["bare"], results["weft"]
    results["ratios"] = {
        "throughput": weft["throughput"]["mbit_s"] / bare["throughput"]["mbit_s"],
        "small_pps": weft["small"]["pps"] / bare["small"]["pps"],
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"UDP, {args.seconds:g} s per run, best of offered rates (iperf3 -u)")
    print(f"{'':28} {'bare WireGuard':>16} {'through Weft':>16} {'ratio':>8}")
    print(f"{'throughput, 1400 B (Mbit/s)':28} {bare['throughput']['mbit_s']:>16.0f} "
          f"{weft['throughput']['mbit_s']:>16.0f} {results['ratios']['throughput']:>8.0%}")
    print(f"{'small, 64 B (packets/s)':28} {bare['small']['pps']:>16.0f} "
          f"{weft['small']['pps']:>16.0f} {results['ratios']['small_pps']:>8.0%}")
    print(f"{'  loss at best rate':28} {bare['throughput']['lost_percent']:>15.1f}% "
          f"{weft['throughput']['lost_percent']:>15.1f}%")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
