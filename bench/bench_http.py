"""Benchmark: a Weft http:// virtual host against nginx proxying over the same WireGuard link.

    sudo .venv/bin/python bench/bench_http.py [--duration 10] [--connections 50] [--rounds 3]

Builds a namespace lab (tests/netns.py), runs nginx as the local web app on the tunnel host
(1 KiB and 64 MiB static files), publishes it through `weft tunnel ... http://bench.example.test`,
and starts a second nginx on the server host that proxies to the tunnel's forwarder on its
WireGuard address (the same WireGuard link and tunnel-side forwarder; only the server-side HTTP
proxy differs), configured for the job Weft does per request: routing by Host and the same
forwarding headers. wrk on the visitor host measures requests per second and latency for 1 KiB
responses through both, alternating in rounds (weft then nginx, then nginx then weft, ...) so a
load that comes and goes on a shared machine hits both alike, and reports the medians; curl
measures large-download throughput through both and straight over WireGuard from the server host.
Prints figures and ratios; never fails on a timing. `--floor` adds a third side, a bare byte
relay on Weft's event loop (bench/relay_floor.py): the CPU per request any proxy built like
Weft's pays before doing any HTTP work.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netns import Lab, wait_tcp_port
from weftlab import SERVER_IP, start_server, start_tunnel, wireguard_listeners

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tcp import process_cpu_seconds

NAME = "bench.example.test"
BASELINE_PORT = 8000
FLOOR_PORT = 8001

NGINX_APP = """
user root;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    {body}
}}
"""

APP_SERVER = """
    server {{ listen 127.0.0.1:8080; root {root}; }}
"""

# The same job Weft's virtual host does per request: route by Host (an unknown name gets a
# 404), pass the Host header on as sent, and replace the visitor's forwarding headers with the
# four Weft adds (X-Forwarded-For/-Proto/-Host and RFC 7239 Forwarded).
PROXY_SERVER = """
    upstream tunnel {{ server {target}; keepalive 128; }}
    server {{
        listen {ip}:{port} default_server;
        return 404;
    }}
    server {{
        listen {ip}:{port};
        server_name {name};
        location / {{
            proxy_pass http://tunnel;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header Forwarded "for=$remote_addr;host=$http_host;proto=$scheme";
            proxy_buffering off;
        }}
    }}
"""


def nginx(host: object, prefix: Path, body: str, name: str) -> None:
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_APP.format(prefix=prefix, body=body))
    host.popen(["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],  # type: ignore[attr-defined]
               name=name)


def nginx_pids(prefix: Path, timeout: float = 10.0) -> list[int]:
    """The nginx master and its worker (the proxying happens in the worker). The master
    accepts connections before it has written its pid file or forked the worker: wait."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            master = int((prefix / "nginx.pid").read_text())
            children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        except (OSError, ValueError):
            children = []
        if children:
            return [master, *map(int, children)]
        if time.monotonic() > deadline:
            raise RuntimeError(f"nginx in {prefix} has no worker process after {timeout} s")
        time.sleep(0.05)


def wrk(lab: Lab, url: str, duration: int, connections: int,
        proxy: list[int] | None = None) -> dict[str, float]:
    """One wrk run; with `proxy` (the server-side proxy's processes), also the CPU they spent
    per request. Each side's figure still moves with the machine's load, but weft's as a
    multiple of nginx's in the same run moves far less than the req/s ratio, which depends on
    the share of the two cores each proxy got."""
    before = sum(map(process_cpu_seconds, proxy)) if proxy else 0.0
    out = lab.visitor.check(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency",
                             "-H", f"Host: {NAME}", url], timeout=duration + 60)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(label: str) -> float:
        m = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    cpu_us = 0.0
    if proxy and done:
        cpu_us = (sum(map(process_cpu_seconds, proxy)) - before) * 1e6 / done
    return {"rps": rps, "p50": pct("50"), "p99": pct("99"),
            "errors": float(errors.group(1)) if errors else 0.0, "cpu_us": cpu_us}


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def download(host: object, url: str) -> float:
    out = host.check(["curl", "-sS", "-o", "/dev/null", "-H", f"Host: {NAME}",  # type: ignore[attr-defined]
                      "-w", "%{speed_download}", url], timeout=300)
    return float(out) * 8 / 1e6  # Mbit/s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--big-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3,
                        help="wrk runs per side, alternating; medians are reported")
    parser.add_argument("--floor", action="store_true",
                        help="also measure a bare byte relay on Weft's event loop (no HTTP work: "
                             "bench/relay_floor.py), the floor under Weft's CPU per request")
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "curl"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            print(f"bench: {tool} is missing (scripts/setup.sh installs it)")
            return 1
    work = Path(tempfile.mkdtemp(prefix="weft-bench-"))
    root = work / "www"
    root.mkdir()
    (root / "1k").write_bytes(b"x" * 1024)
    with (root / "big").open("wb") as f:
        f.write(b"\0" * (args.big_mib << 20))
    try:
        with Lab() as lab:
            nginx(lab.tunnel, work / "app", APP_SERVER.format(root=root), "nginx-app")
            wait_tcp_port(lab.tunnel, "127.0.0.1", 8080)
            server = start_server(lab)
            start_tunnel(lab, server.url(), "http://127.0.0.1:8080", f"http://{NAME}")
            (wg_addr, fwd_port), = wireguard_listeners(lab.tunnel)
            nginx(lab.server, work / "proxy", PROXY_SERVER.format(
                target=f"{wg_addr}:{fwd_port}", ip=SERVER_IP, port=BASELINE_PORT, name=NAME),
                "nginx-proxy")
            wait_tcp_port(lab.visitor, SERVER_IP, BASELINE_PORT)
            proxies = {"weft": [server.proc.pid], "nginx": nginx_pids(work / "proxy")}
            urls = {"weft": f"http://{SERVER_IP}/1k",
                    "nginx": f"http://{SERVER_IP}:{BASELINE_PORT}/1k"}
            if args.floor:
                relay = lab.server.popen(
                    [sys.executable, str(Path(__file__).with_name("relay_floor.py")), SERVER_IP,
                     str(FLOOR_PORT), wg_addr, str(fwd_port)], name="relay-floor")
                relay.wait_for_line("relay ready")
                proxies["relay"] = [relay.pid]
                urls["relay"] = f"http://{SERVER_IP}:{FLOOR_PORT}/1k"

            for url in urls.values():  # warm up every path
                wrk(lab, url, 2, args.connections)
            load_before = os.getloadavg()[0]
            runs: dict[str, list[dict[str, float]]] = {side: [] for side in urls}
            for i in range(max(args.rounds, 1)):
                order = list(urls)
                for side in order if i % 2 == 0 else order[::-1]:
                    runs[side].append(wrk(lab, urls[side], args.duration, args.connections,
                                          proxies[side]))
            load_after = os.getloadavg()[0]
            weft, base = median_run(runs["weft"]), median_run(runs["nginx"])
            big_weft = download(lab.visitor, f"http://{SERVER_IP}/big")
            big_nginx = download(lab.visitor, f"http://{SERVER_IP}:{BASELINE_PORT}/big")
            big_wg = download(lab.server, f"http://{wg_addr}:{fwd_port}/big")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rounds = max(args.rounds, 1)
    print(f"\n1 KiB responses, wrk -t2 -c{args.connections} -d{args.duration}s, keep-alive, "
          f"median of {rounds} alternating runs each (load average {load_before:.2f} before, "
          f"{load_after:.2f} after):")
    for i, (w, b) in enumerate(zip(runs["weft"], runs["nginx"], strict=True)):
        print(f"  round {i + 1}: weft {w['rps']:.0f} req/s p99 {w['p99']:.2f} ms "
              f"{w['cpu_us']:.1f} us CPU/req, nginx {b['rps']:.0f} req/s p99 {b['p99']:.2f} ms "
              f"{b['cpu_us']:.1f} us CPU/req, ratio {w['rps'] / b['rps']:.2f}")
    print(f"  {'':<28} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    for label, r in (("weft virtual host", weft), ("nginx reverse proxy", base)):
        print(f"  {label:<28} {r['rps']:>10.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} "
              f"{r['errors']:>8.0f}")
    print(f"  ratio weft/nginx: req/s {weft['rps'] / base['rps']:.2f} (goal >= 0.90), "
          f"p99 {weft['p99'] / base['p99']:.2f} (goal <= 2.0)")
    print(f"  server-side proxy CPU per request (user+sys, median): weft server "
          f"{weft['cpu_us']:.1f} us, nginx {base['cpu_us']:.1f} us")
    if "relay" in runs:
        floor = median_run(runs["relay"])
        print(f"  bare byte relay on Weft's loop (no HTTP work): {floor['rps']:.0f} req/s, "
              f"p99 {floor['p99']:.2f} ms, {floor['cpu_us']:.1f} us CPU per request (rounds: "
              + ", ".join(f"{r['cpu_us']:.1f}" for r in runs["relay"])
              + f"); weft's HTTP work on top of it: {weft['cpu_us'] - floor['cpu_us']:.1f} us")
    print(f"\n{args.big_mib} MiB download (Mbit/s):")
    print(f"  weft virtual host {big_weft:.0f}, nginx reverse proxy {big_nginx:.0f}, "
          f"straight over WireGuard from the server {big_wg:.0f}")
    print(f"  ratio weft/WireGuard {big_weft / big_wg:.2f}, weft/nginx {big_weft / big_nginx:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
