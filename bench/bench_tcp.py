"""TCP scenarios of the Weft benchmark, each against its baseline in the same lab and run.

Run through `bench/run.py` (the one command); `run_tcp(settings)` returns the figures as a dict.

Lab (tests/netns.py): server 198.51.100.1, visitor 198.51.100.20, tunnel host 203.0.113.10 behind
NAT, plus a few more tunnel hosts for the many-tunnels scenario. Next to Weft's own WireGuard
link, a bare wireguard-go pair joins the server host and the tunnel host (10.9.0.1 <-> 10.9.0.2,
built with weft_core.wireguard as tests/e2e/wg_node.py does): the baselines run over it.

- bulk: iperf3 -P 1 and -P 8 visitor -> Weft public port -> tunnel -> iperf3 on loopback, against
  iperf3 server host -> bare WireGuard -> iperf3 on the tunnel host's WireGuard address;
- latency: connect-to-first-byte from the visitor to a one-byte banner service through Weft,
  against socat on both ends of the bare WireGuard link (the hand-built relay chain);
- start: `weft tunnel` launched until the visitor gets the first byte on the public port;
- idle: N connections held through one tunnel: RSS of the weft server and tunnel processes, and
  connect-to-first-byte of new connections meanwhile;
- tunnels: N tunnels from a few tunnel hosts on one server: login-to-ready, server RSS.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from inotify_limit import raised_inotify_limit  # noqa: E402

from netns import Host, Lab, Proc, wait_tcp_port  # noqa: E402
from weft_core.wireguard import generate_private_key, public_key  # noqa: E402
from weftlab import SERVER_IP, WEFT, start_server, start_tunnel  # noqa: E402

CLIENTS = str(REPO / "bench" / "clients.py")
DRIVER = str(REPO / "bench" / "tunnels_driver.py")
WG_NODE = REPO / "tests" / "e2e" / "wg_node.py"
BARE_SERVER, BARE_TUNNEL, BARE_WG_PORT = "10.9.0.1", "10.9.0.2", 9194

IPERF_PORT = 5201  # on the tunnel host: 127.0.0.1 for Weft, 10.9.0.2 for bare WireGuard
BANNER_PORT = 7000  # the one-byte banner service, tunnel host loopback
PUBLIC_BULK, PUBLIC_BANNER, PUBLIC_START = 15201, 17000, 17100
SOCAT_TUNNEL_PORT, SOCAT_PUBLIC_PORT = 7001, 17001


@attrs.frozen
class TcpSettings:
    repeat: int = 3
    seconds: float = 5.0  # per iperf3 run
    latency_samples: int = 300
    start_runs: int = 5
    idle_connections: int = 10_000
    idle_probes: int = 100
    tunnels: int = 200
    tunnel_hosts: int = 4
    scenarios: tuple[str, ...] = ("bulk", "latency", "start", "idle", "tunnels")

    @classmethod
    def quick(cls, scenarios: tuple[str, ...] | None = None) -> TcpSettings:
        return cls(
            repeat=1,
            seconds=1.0,
            latency_samples=20,
            start_runs=2,
            idle_connections=200,
            idle_probes=10,
            tunnels=6,
            tunnel_hosts=2,
            **({"scenarios": scenarios} if scenarios else {}),
        )


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wireguard_go_rss(host: Host) -> float:
    total = 0.0
    for pid in host.pids():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "wireguard-go":
                total += rss_mb(pid)
        except OSError:
            continue
    return total


def client(host: Host, *args: object, timeout: float = 180) -> Any:
    out = host.check([sys.executable, CLIENTS, *map(str, args)], timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


# --- bare WireGuard (the baseline link) --------------------------------------------------------


class WgNode:
    """tests/e2e/wg_node.py in a namespace, driven by JSON lines; EOF on stdin removes it."""

    def __init__(self, host: Host) -> None:
        self.proc = subprocess.Popen(
            host.exec_args([sys.executable, str(WG_NODE)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            start_new_session=True,
        )

    def __call__(self, op: str, **kwargs: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        if not answer["ok"]:
            raise RuntimeError(answer["error"])
        return answer["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def bare_wireguard(lab: Lab) -> list[WgNode]:
    server_key, tunnel_key = generate_private_key(), generate_private_key()
    nodes = [WgNode(lab.server), WgNode(lab.tunnel)]
    server, tunnel = nodes
    try:
        server(
            "create",
            prefix="bbs",
            key=server_key,
            address=f"{BARE_SERVER}/24",
            listen_port=BARE_WG_PORT,
        )
        tunnel(
            "create", prefix="bbt", key=tunnel_key, address=f"{BARE_TUNNEL}/24", listen_port=None
        )
        server("set_peer", public_key=public_key(tunnel_key), allowed_ips=[f"{BARE_TUNNEL}/32"])
        tunnel(
            "set_peer",
            public_key=public_key(server_key),
            allowed_ips=[f"{BARE_SERVER}/32"],
            endpoint=f"{SERVER_IP}:{BARE_WG_PORT}",
            persistent_keepalive=1,
        )
        deadline = time.monotonic() + 15
        while not any(p["handshake"] for p in tunnel("peers")):
            if time.monotonic() > deadline:
                raise RuntimeError("no handshake between the bare WireGuard pair")
            time.sleep(0.05)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


# --- scenarios -------------------------------------------------------------------------------


def iperf(client_host: Host, host: str, port: int, seconds: float, streams: int) -> float:
    args = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"]
    for attempt in range(3):  # iperf3's server can refuse a test right after a port probe
        result = client_host.run(args, timeout=seconds + 60)
        data = json.loads(result.stdout)
        if "error" not in data:
            return float(data["end"]["sum_received"]["bits_per_second"]) / 1e6
        log(f"iperf3 attempt {attempt + 1}: {data['error']}")
        time.sleep(1)
    raise RuntimeError(f"iperf3 {' '.join(args)}: {data['error']}")


def bulk(lab: Lab, s: TcpSettings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for streams in (1, 8):
        weft, bare = [], []
        for _ in range(s.repeat):  # interleaved, so drifting load hits both alike
            bare.append(iperf(lab.server, BARE_TUNNEL, IPERF_PORT, s.seconds, streams))
            weft.append(iperf(lab.visitor, SERVER_IP, PUBLIC_BULK, s.seconds, streams))
        out[f"streams_{streams}"] = {
            "weft_mbit_s": statistics.median(weft),
            "bare_mbit_s": statistics.median(bare),
            "weft_runs": weft,
            "bare_runs": bare,
        }
        log(f"bulk {streams} stream(s): weft {weft} bare {bare} Mbit/s")
    return out


def latency(lab: Lab, s: TcpSettings) -> dict[str, Any]:
    weft_t, socat_t = f"{SERVER_IP}:{PUBLIC_BANNER}", f"{SERVER_IP}:{SOCAT_PUBLIC_PORT}"
    weft, socat, weft99, socat99 = [], [], [], []
    for _ in range(s.repeat):
        r = client(lab.visitor, "latency", s.latency_samples, weft_t, socat_t)
        weft.append(r[weft_t]["p50"])
        socat.append(r[socat_t]["p50"])
        weft99.append(r[weft_t]["p99"])
        socat99.append(r[socat_t]["p99"])
    log(f"latency p50 ms: weft {weft} socat {socat}")
    return {
        "weft_p50_ms": statistics.median(weft),
        "socat_p50_ms": statistics.median(socat),
        "weft_p99_ms": statistics.median(weft99),
        "socat_p99_ms": statistics.median(socat99),
    }


def start_time(lab: Lab, server_url: str, s: TcpSettings) -> dict[str, Any]:
    runs = []
    for i in range(s.start_runs):
        probe = lab.visitor.popen(
            [sys.executable, CLIENTS, "firstbyte", SERVER_IP, str(PUBLIC_START), "20"],
            name=f"firstbyte-{i}",
        )
        probe.wait_for_line(r"^polling", timeout=10)
        t0 = time.monotonic()
        tunnel = lab.tunnel.popen(
            [
                WEFT,
                "tunnel",
                server_url,
                f"tcp://127.0.0.1:{BANNER_PORT}",
                f"tcp://:{PUBLIC_START}",
                "--name",
                f"start-{i}",
            ],
            name=f"start-tunnel-{i}",
        )
        answer = json.loads(probe.wait_for_line(r"^\{", timeout=30).string)
        if answer["t"] is None:
            raise RuntimeError(f"tunnel start {i}: no first byte within 20 s:\n{tunnel.output()}")
        runs.append(answer["t"] - t0)
        tunnel.terminate(10)
        probe.kill()
    log(f"start seconds: {runs}")
    return {"median_s": statistics.median(runs), "runs": runs}


def fd_capped(wanted: int) -> int:
    """Connections one relay process can hold: two sockets each, under the hard fd limit
    (which only CAP_SYS_RESOURCE can raise; weft raises its soft limit to it)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return wanted
    return min(wanted, (hard - 300) // 2)


def idle(lab: Lab, server_pid: int, tunnel_pid: int, s: TcpSettings) -> dict[str, Any]:
    before = rss_mb(server_pid) + rss_mb(tunnel_pid)
    wanted = fd_capped(s.idle_connections)
    if wanted < s.idle_connections:
        log(
            f"idle: the hard open-file limit allows {wanted} relayed connections per process, "
            f"not {s.idle_connections}; RSS is also extrapolated to {s.idle_connections}"
        )
    holder = lab.visitor.popen(
        [
            sys.executable,
            CLIENTS,
            "hold",
            SERVER_IP,
            str(PUBLIC_BANNER),
            str(wanted),
            str(s.idle_probes),
        ],
        name="holder",
    )
    held = holder.wait_for_line(r"^held (\d+) failed (\d+)", timeout=400)
    rss_held = rss_mb(server_pid) + rss_mb(tunnel_pid)
    answer = json.loads(holder.wait_for_line(r"^\{", timeout=120).string)
    rss = max(rss_held, rss_mb(server_pid) + rss_mb(tunnel_pid))
    wg = wireguard_go_rss(lab.server) + wireguard_go_rss(lab.tunnel)
    holder.kill()
    log(f"idle: {held.group(0)}; rss {before:.1f} -> {rss:.1f} MB; new {answer}")
    n = int(held.group(1))
    per_conn = (rss - before) / n if n else 0.0
    return {
        "connections": n,
        "wanted": s.idle_connections,
        "failed": answer["failed"],
        "rss_mb": rss,
        "rss_before_mb": before,
        "wireguard_go_rss_mb": wg,
        "rss_kb_per_connection": per_conn * 1024,
        "rss_at_wanted_mb": before + per_conn * s.idle_connections,
        "open_seconds": answer["open_seconds"],
        "new_p50_ms": answer["p50"],
        "new_p99_ms": answer["p99"],
        "new_max_ms": answer["max"],
    }


def many_tunnels(lab: Lab, server_url: str, server_pid: int, s: TcpSettings) -> dict[str, Any]:
    # Every wireguard-go takes an inotify instance: raised for this run if need be, then restored.
    with raised_inotify_limit(s.tunnels, lambda message: log(f"tunnels: {message}")) as room:
        return _many_tunnels(lab, server_url, server_pid, s, room)


def _many_tunnels(
    lab: Lab, server_url: str, server_pid: int, s: TcpSettings, room: int
) -> dict[str, Any]:
    before = rss_mb(server_pid)
    wanted = s.tunnels
    s = attrs.evolve(s, tunnels=room)
    if s.tunnels < wanted:
        log(f"tunnels: running {s.tunnels} of {wanted} (inotify instances, see above)")
    per_host = -(-s.tunnels // s.tunnel_hosts)
    drivers: list[Proc] = []
    left = s.tunnels
    for h in range(s.tunnel_hosts):
        count = min(per_host, left)
        left -= count
        if count <= 0:
            break
        host = lab.hosts.get(f"tun{h}") or lab.add_host(f"tun{h}", f"203.0.113.{20 + h}")
        host.popen(
            [sys.executable, CLIENTS, "banner", "127.0.0.1", str(BANNER_PORT)],
            name=f"banner-tun{h}",
        ).wait_for_line("^listening", timeout=10)
        drivers.append(
            host.popen(
                [sys.executable, DRIVER, server_url, f"many{h}", str(count), str(BANNER_PORT)],
                name=f"driver-tun{h}",
            )
        )
    started = time.monotonic()
    machine_before, server_before = machine_cpu(), process_cpu_seconds(server_pid)
    for d in drivers:
        d.wait_for_line(r"^ALL READY", timeout=60 + 5 * per_host)
    total = time.monotonic() - started
    machine_after, server_cpu = machine_cpu(), process_cpu_seconds(server_pid) - server_before
    busy = (machine_after[0] - machine_before[0]) / max(1, machine_after[1] - machine_before[1])
    results = [
        json.loads(line[7:]) for d in drivers for line in d.lines() if line.startswith("RESULT ")
    ]
    ok = [r for r in results if r["ok"]]
    if len(ok) < len(results):
        errors = collections.Counter(
            r.get("error", "not ready in 30 s") for r in results if not r["ok"]
        )
        log(f"tunnels that failed: {dict(errors)}")
    seconds = sorted(r["seconds"] for r in ok)
    rss = rss_mb(server_pid)
    phases = median_phases(ok)
    # Where the p99 goes: the same phases over the slowest tenth of the tunnels.
    slow = sorted(ok, key=lambda r: r["seconds"])[len(ok) * 9 // 10 :]
    tail_phases = median_phases(slow)
    if os.environ.get("WEFT_BENCH_SAMPLES"):
        Path(os.environ["WEFT_BENCH_SAMPLES"]).write_text(json.dumps(results))
    drivers_cpu = sum(process_cpu_seconds(d.pid) for d in drivers)
    for d in drivers:
        d.terminate(40)
    p = (
        (lambda q: seconds[min(len(seconds) - 1, round(q * (len(seconds) - 1)))] * 1000)
        if seconds
        else (lambda q: float("nan"))
    )
    log(
        f"tunnels: {len(ok)}/{len(results)} ready in {total:.1f}s; p50 {p(0.5):.0f} ms "
        f"p99 {p(0.99):.0f} ms; server rss {before:.1f} -> {rss:.1f} MB; CPUs {busy:.0%} busy, "
        f"the server process {server_cpu:.1f} s of CPU, the tunnel hosts' {drivers_cpu:.1f} s"
    )
    log(f"tunnels: median phases (ms) {_ms(phases)}")
    log(f"tunnels: median phases of the slowest 10% (ms) {_ms(tail_phases)}")
    return {
        "tunnels": len(ok),
        "wanted": wanted,
        "failed": len(results) - len(ok),
        "hosts": len(drivers),
        "p50_ms": p(0.5),
        "p99_ms": p(0.99),
        "max_ms": p(1.0),
        "server_rss_mb": rss,
        "server_rss_before_mb": before,
        "total_seconds": total,
        "cpu_busy": busy,  # all CPUs of the machine, while the tunnels started
        "server_cpu_seconds": server_cpu,
        "tunnel_hosts_cpu_seconds": drivers_cpu,  # their weft processes (not wireguard-go)
        "median_phases_ms": {k: v * 1000 for k, v in phases.items()},
        "slowest_tenth_phases_ms": {k: v * 1000 for k, v in tail_phases.items()},
    }


def machine_cpu() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def process_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far (the one reader of /proc/PID/stat here)."""
    # Fields after the command name (which may hold spaces): utime and stime are 14th and 15th.
    after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(after_name[11]) / tick, int(after_name[12]) / tick


def process_cpu_seconds(pid: int) -> float:
    return sum(process_times(pid))


def median_phases(results: list[dict[str, Any]]) -> dict[str, float]:
    if not results:
        return {}
    return {k: statistics.median(r["phases"][k] for r in results) for k in results[0]["phases"]}


def _ms(phases: dict[str, float]) -> str:
    return ", ".join(f"{k} {v * 1000:.1f}" for k, v in phases.items())


# --- the lab ---------------------------------------------------------------------------------


def run_tcp(s: TcpSettings) -> dict[str, Any]:
    """Build the lab, run the selected TCP scenarios, tear everything down; return figures."""
    results: dict[str, Any] = {}
    with Lab() as lab:
        nodes = bare_wireguard(lab)
        try:
            t = lab.tunnel
            t.popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF_PORT)], name="iperf3-lo")
            t.popen(["iperf3", "-s", "-B", BARE_TUNNEL, "-p", str(IPERF_PORT)], name="iperf3-wg")
            t.popen(
                [sys.executable, CLIENTS, "banner", "127.0.0.1", str(BANNER_PORT)], name="banner"
            ).wait_for_line("^listening", timeout=10)
            t.popen(
                [
                    "socat",
                    f"TCP-LISTEN:{SOCAT_TUNNEL_PORT},bind={BARE_TUNNEL},fork,reuseaddr,"
                    "nodelay,backlog=4096",
                    f"TCP:127.0.0.1:{BANNER_PORT},nodelay",
                ],
                name="socat-tunnel",
            )
            lab.server.popen(
                [
                    "socat",
                    f"TCP-LISTEN:{SOCAT_PUBLIC_PORT},bind={SERVER_IP},fork,"
                    "reuseaddr,nodelay,backlog=4096",
                    f"TCP:{BARE_TUNNEL}:{SOCAT_TUNNEL_PORT},nodelay",
                ],
                name="socat-server",
            )
            server = start_server(lab)
            tunnel = start_tunnel(
                lab,
                server.url(),
                f"tcp://127.0.0.1:{IPERF_PORT}",
                f"tcp://:{PUBLIC_BULK}",
                f"tcp://127.0.0.1:{BANNER_PORT}",
                f"tcp://:{PUBLIC_BANNER}",
            )
            wait_tcp_port(lab.visitor, SERVER_IP, PUBLIC_BULK)
            wait_tcp_port(lab.visitor, SERVER_IP, SOCAT_PUBLIC_PORT)
            wait_tcp_port(lab.server, BARE_TUNNEL, IPERF_PORT)
            if "bulk" in s.scenarios:
                results["bulk"] = bulk(lab, s)
            if "latency" in s.scenarios:
                results["latency"] = latency(lab, s)
            if "start" in s.scenarios:
                results["start"] = start_time(lab, server.url(), s)
            if "idle" in s.scenarios:
                results["idle"] = idle(lab, server.proc.pid, tunnel.pid, s)
            if "tunnels" in s.scenarios:
                results["tunnels"] = many_tunnels(lab, server.url(), server.proc.pid, s)
        finally:
            for node in nodes:
                node.stop()
    return results
