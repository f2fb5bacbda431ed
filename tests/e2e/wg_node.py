"""A WireGuard node for the e2e tests, run inside a namespace with `ip netns exec`.

It reads one JSON command per line on stdin and answers one JSON line on stdout, so a test can
drive several namespaces from one process. EOF on stdin closes everything and exits.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from typing import Any

from weft_core.firewall import ServerIsolation, TunnelIsolation
from weft_core.wireguard import Peer, WireGuardInterface, unique_interface_name


class Node:
    def __init__(self) -> None:
        self.iface: WireGuardInterface | None = None
        self.isolation: ServerIsolation | TunnelIsolation | None = None
        self.listeners: list[socket.socket] = []

    def create(
        self, prefix: str, key: str, address: str, listen_port: int | None
    ) -> dict[str, Any]:
        name = unique_interface_name(prefix)
        self.iface = WireGuardInterface.create(name, key, address, listen_port=listen_port)
        device = self.iface._device
        return {
            "name": name,
            "backend": self.iface.backend_name,
            "port": self.iface.listen_port(),
            "pid": getattr(device, "pid", None),
        }

    def set_peer(self, **peer: Any) -> None:
        assert self.iface is not None
        peer["allowed_ips"] = tuple(peer["allowed_ips"])
        self.iface.set_peer(Peer(**peer))

    def route(self, destination: str, table: int | None = None) -> None:
        assert self.iface is not None
        self.iface.add_route(destination, table)

    def rule(self, source: str, table: int, priority: int) -> None:
        assert self.iface is not None
        self.iface.add_source_rule(source, table, priority)

    def peers(self) -> list[dict[str, Any]]:
        assert self.iface is not None
        return [
            {
                "public_key": p.public_key,
                "endpoint": p.endpoint,
                "rx": p.rx_bytes,
                "tx": p.tx_bytes,
                "handshake": p.last_handshake,
            }
            for p in self.iface.peers()
        ]

    def isolate_server(self) -> None:
        assert self.iface is not None
        self.isolation = ServerIsolation(self.iface.name)
        self.isolation.apply()

    def isolate_tunnel(self, server: str, tcp: list[int], udp: list[int]) -> None:
        assert self.iface is not None
        if not isinstance(self.isolation, TunnelIsolation):
            self.isolation = TunnelIsolation(self.iface.name, server)
        self.isolation.apply(set(tcp), set(udp))

    def unisolate(self) -> None:
        if self.isolation is not None:
            self.isolation.close()

    def listen(self, host: str, port: int) -> None:
        sock = socket.create_server((host, port))
        self.listeners.append(sock)

        def serve() -> None:
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                conn.sendall(b"hello\n")
                conn.close()

        threading.Thread(target=serve, daemon=True).start()

    def connect(self, host: str, port: int, timeout: float) -> str:
        try:
            with socket.create_connection((host, port), timeout=timeout) as conn:
                return "ok" if conn.recv(16) == b"hello\n" else "garbled"
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"
        except OSError as exc:
            return f"error: {exc}"

    def close(self) -> None:
        for sock in self.listeners:
            sock.close()
        self.unisolate()
        if self.iface is not None:
            self.iface.close()
            self.iface.close()  # idempotence is part of the contract


def main() -> None:
    node = Node()
    try:
        for line in sys.stdin:
            request = json.loads(line)
            op = request.pop("op")
            try:
                result = getattr(node, op)(**request)
                answer = {"ok": True, "result": result}
            except Exception as exc:
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)
    finally:
        node.close()


if __name__ == "__main__":
    main()
