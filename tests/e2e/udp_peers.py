"""Small real UDP peers for the udp:// end-to-end tests: `python udp_peers.py CMD ...`.

Service (run in the tunnel host):  echo ADDR PORT        (prints "listening ADDR:PORT")
Visitors (print one JSON line):    order HOST PORT COUNT SIZE
                                   | sizes HOST PORT SIZE...
                                   | many HOST PORT SOCKETS ROUNDS
                                   | flood HOST PORT TOTAL CHUNK FIRST_PORT [SOURCES]
                                   | probe HOST PORT TIMEOUT

Every visitor payload starts with a tag naming its socket and sequence number, and the echo
service returns it unchanged, so a reply that reached the wrong visitor is seen at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import socket
import sys
import time

BUFFER = 4 * 1024 * 1024


def _big_buffers(sock: socket.socket) -> None:
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # *BUFFORCE (root)
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, BUFFER)


def echo(addr: str, port: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _big_buffers(sock)
    sock.bind((addr, int(port)))
    print(f"listening {addr}:{port}", flush=True)
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


def _payload(tag: bytes, size: int) -> bytes:
    """`tag|` then deterministic filler up to `size` bytes (at least the tag)."""
    head = tag + b"|"
    filler = hashlib.sha256(tag).digest() * (size // 32 + 1)
    return (head + filler)[: max(size, len(head))]


def _recv_all(sock: socket.socket, count: int, timeout: float) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            got.append(sock.recv(65535))
        except TimeoutError:
            break
    return got


def _client(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _big_buffers(sock)
    sock.connect((host, port))
    return sock


def order(host: str, port: str, count: str, size: str, window: str = "25") -> dict[str, object]:
    """COUNT datagrams, WINDOW back to back at a time; replies must come back whole, in order.

    Windows keep each burst within what wireguard-go's own socket buffer (208 KiB on Debian's
    0.0.20220316) takes at once: a longer burst loses datagrams to WireGuard, tunnel or not.
    """
    sock = _client(host, int(port))
    sent = [_payload(b"seq%06d" % i, int(size)) for i in range(int(count))]
    got: list[bytes] = []
    for start in range(0, len(sent), int(window)):
        batch = sent[start : start + int(window)]
        for data in batch:
            sock.send(data)
        got += _recv_all(sock, len(batch), 10.0)
    return {
        "sent": len(sent),
        "received": len(got),
        "in_order": got == sent,
        "intact": set(got) <= set(sent),
    }


def sizes(host: str, port: str, *wanted: str) -> dict[str, object]:
    """One datagram of each size, one at a time; which came back whole."""
    sock = _client(host, int(port))
    result = {}
    for size in map(int, wanted):
        data = _payload(b"size%d" % size, size)
        sock.send(data)
        got = _recv_all(sock, 1, 5.0)
        result[str(size)] = bool(got) and got[0] == data
    return {"whole": result}


def many(host: str, port: str, sockets: str, rounds: str) -> dict[str, object]:
    """SOCKETS visitors (distinct source ports) at once, ROUNDS exchanges each.

    Like any UDP client (a DNS resolver, a game), a visitor sends its request again when no
    answer came within a second: WireGuard may drop some of a burst of hundreds of datagrams
    sent within a millisecond. What counts is that every visitor gets its own answers, in order,
    and never another visitor's.
    """
    socks = [_client(host, int(port)) for _ in range(int(sockets))]
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    sel = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
    received: list[list[bytes]] = [[] for _ in socks]
    expected: list[list[bytes]] = [[] for _ in socks]
    foreign = resent = 0
    for rnd in range(int(rounds)):
        current = [
            _payload(b"visitor%04d-round%03d" % (i, rnd), 64 + (i * 7 + rnd) % 900)
            for i in range(len(socks))
        ]
        pending = set(range(len(socks)))
        for i in pending:
            expected[i].append(current[i])
            socks[i].send(current[i])
        deadline = time.monotonic() + 15
        resend_at = time.monotonic() + 1.0
        while pending and time.monotonic() < deadline:
            if time.monotonic() >= resend_at:
                for i in pending:
                    socks[i].send(current[i])
                    resent += 1
                resend_at = time.monotonic() + 1.0
            for key, _ in sel.select(0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                i = by_fd[sock.fileno()]
                while True:
                    try:
                        data = sock.recv(65535)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    if not data.startswith(b"visitor%04d-" % i):
                        foreign += 1
                    elif data == current[i] and i in pending:
                        received[i].append(data)
                        pending.discard(i)
                    elif data not in expected[i]:
                        foreign += 1  # mangled, or an answer that was never asked for
    ok = sum(1 for i in range(len(socks)) if received[i] == expected[i])
    ports = {s.getsockname()[1] for s in socks}
    for sock in socks:
        sock.close()
    return {"sessions": len(ports), "ok": ok, "foreign": foreign,
            "received": sum(map(len, received)), "resent": resent}


def flood(host: str, port: str, total: str, chunk: str, first_port: str,
          sources: str = "0.0.0.0") -> dict[str, object]:
    """TOTAL new source addresses, CHUNK at a time: each sends one datagram and waits for its
    echo. Source n is (SOURCES[n % len], FIRST_PORT + n // len): SOURCES, comma-separated, are
    addresses of this host."""
    target = (host, int(port))
    sent = replied = foreign = 0
    base = int(first_port)
    ips = sources.split(",")
    sel = selectors.DefaultSelector()
    for start in range(0, int(total), int(chunk)):
        socks = {}
        for n in range(start, min(start + int(chunk), int(total))):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((ips[n % len(ips)], base + n // len(ips)))
            except OSError:
                sock.close()
                continue
            sock.setblocking(False)
            sock.sendto(b"flood%06d" % n, target)
            sent += 1
            socks[sock.fileno()] = (n, sock)
            sel.register(sock, selectors.EVENT_READ)
        waiting = len(socks)
        deadline = time.monotonic() + 5
        while waiting and time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                n, sock = socks[key.fd]
                try:
                    data = sock.recv(100)
                except OSError:
                    continue
                if data == b"flood%06d" % n:
                    replied += 1
                else:
                    foreign += 1
                sel.unregister(sock)
                waiting -= 1
        for _, sock in socks.values():
            if sock.fileno() in sel.get_map():
                sel.unregister(sock)
            sock.close()
    return {"sent": sent, "replied": replied, "foreign": foreign}


def probe(host: str, port: str, timeout: str) -> dict[str, object]:
    sock = _client(host, int(port))
    sock.send(b"probe")
    try:
        got = _recv_all(sock, 1, float(timeout))
    except ConnectionRefusedError:
        return {"state": "refused"}
    return {"state": "answered" if got == [b"probe"] else "silent"}


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "echo":
        echo(*args)
        return
    result = {"order": order, "sizes": sizes, "many": many, "flood": flood, "probe": probe}[cmd](
        *args
    )
    print(json.dumps(result), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
