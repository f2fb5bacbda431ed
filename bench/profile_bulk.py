"""Where the CPU goes in the TCP bulk scenario: per-process CPU, and py-spy on the weft relays.

    sudo .venv/bin/python bench/profile_bulk.py [--seconds 8] [--streams 1]

Builds the same lab as bench/bench_tcp.py, runs iperf3 through Weft, and meanwhile samples the
weft server and tunnel with py-spy (pip install 'weft[bench]'). Prints the CPU seconds each
process on the data path used (the weft relays, both wireguard-go, both iperf3) and the hottest
frames of each weft process (self time, from py-spy's collapsed stacks). Tears everything down.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tcp import IPERF_PORT, PUBLIC_BULK, process_cpu_seconds, wait_tcp_port

from netns import Host, Lab
from weftlab import SERVER_IP, start_server, start_tunnel


def data_path_pids(hosts: list[Host]) -> dict[str, int]:
    found = {}
    for host in hosts:
        for pid in host.pids():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if comm in ("wireguard-go", "iperf3") or any(c.endswith(b"/weft") for c in cmd):
                found[f"{host.name}:{comm}:{pid}"] = pid
    return found


def hot_frames(raw: Path, top: int) -> list[tuple[float, str]]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        counts[stack.split(";")[-1]] += int(n)
    return [(100 * c / total, frame) for frame, c in counts.most_common(top)] if total else []


def _received_bytes(output: str) -> float:
    """Bytes the iperf3 receiver got, from the client's summary (`... receiver` line)."""
    units = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}
    receiver = [line for line in output.splitlines() if line.rstrip().endswith("receiver")]
    # With -P N the per-stream lines come first: the [SUM] line is the total. One stream: no SUM.
    totals = [line for line in receiver if "[SUM]" in line] or receiver[:1]
    for line in totals:
        parts = line.split()
        i = next(j for j, p in enumerate(parts) if p.endswith("Bytes"))
        return float(parts[i - 1]) * units[parts[i][0] if parts[i][0] in "KMG" else ""]
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    work = Path(tempfile.mkdtemp(prefix="weft-profile-"))
    with Lab() as lab:
        lab.tunnel.popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF_PORT)], name="ip")
        server = start_server(lab)
        tunnel = start_tunnel(
            lab, server.url(), f"tcp://127.0.0.1:{IPERF_PORT}", f"tcp://:{PUBLIC_BULK}"
        )
        wait_tcp_port(lab.visitor, SERVER_IP, PUBLIC_BULK)
        client = lab.visitor.popen(
            [
                "iperf3",
                "-c",
                SERVER_IP,
                "-p",
                str(PUBLIC_BULK),
                "-t",
                str(args.seconds + 2),
                "-P",
                str(args.streams),
            ],
            name="iperf3-client",
        )
        time.sleep(1)
        pids = data_path_pids([lab.server, lab.tunnel, lab.visitor])
        before = {k: process_cpu_seconds(p) for k, p in pids.items()}
        spies = {
            name: subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(args.seconds)),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(work / f"{name}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in (("server", server.proc.pid), ("tunnel", tunnel.pid))
        }
        started = time.monotonic()
        for spy in spies.values():
            spy.wait(args.seconds + 30)
        elapsed = time.monotonic() - started
        after = {k: process_cpu_seconds(p) for k, p in pids.items() if Path(f"/proc/{p}").exists()}
        client.wait(60)
        # CPU was read over the profile's window only: count the bytes of that window too (the
        # run's average rate; iperf3 ran `seconds + 2` in all).
        relayed = _received_bytes(client.output()) * elapsed / (args.seconds + 2)
    weft_cpu = sum(after[k] - before[k] for k in after if ":weft:" in k or k.endswith("python"))
    print(
        f"relayed {relayed / 1e9:.2f} GB; weft server+tunnel CPU "
        f"{weft_cpu:.2f} s = {weft_cpu / max(relayed / 1e9, 1e-9):.2f} CPU-s per GB"
    )
    print(f"\nCPU over {elapsed:.1f}s (100% = one core), load {os.getloadavg()[0]:.2f}:")
    for key in sorted(after, key=lambda k: before[k] - after[k]):
        print(f"  {key:40} {100 * (after[key] - before[key]) / elapsed:6.1f}%")
    for name in spies:
        print(f"\nweft {name}: hottest frames (self time, % of samples)")
        for pct, frame in hot_frames(work / f"{name}.txt", args.top):
            print(f"  {pct:5.1f}%  {frame}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
