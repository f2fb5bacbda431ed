"""https:// virtual hosts end to end, with a real ACME CA (Pebble) and a real resolver (dnsmasq).

The lab gets one more public host, `acme` (198.51.100.30), running dnsmasq (every name under
example.test resolves to the server) and Pebble (which validates HTTP-01 on the server's port 80
through that resolver). Nothing leaves the lab: the server is always given --acme-directory.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_http import websocket_echo

from netns import Lab, Proc
from weftlab import SERVER_IP, WEFT, start_server, start_tunnel, wait_ready

pytestmark = pytest.mark.netns

APP = str(Path(__file__).resolve().parent / "http_app.py")
ACME_IP = "198.51.100.30"
DIRECTORY = f"https://{ACME_IP}:14000/dir"
NAME = "app.example.test"


# --- certificates made by the test ------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_cert(sans: list[x509.GeneralName], issuer: tuple[x509.Certificate, object] | None = None,
              ca: bool = False, days: int = 30) -> tuple[bytes, bytes, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    common_name = "weft test CA" if ca else "weft test"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[0].subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    signer = issuer[1] if issuer else key
    cert = builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), cert


# --- lab pieces ----------------------------------------------------------------------------------


def start_acme_host(lab: Lab, tmp: Path) -> tuple[Proc, str]:
    """dnsmasq + Pebble on a new lab host; returns (pebble, path of Pebble's API certificate)."""
    host = lab.add_host("acme", ACME_IP)
    dns = host.popen(["dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
                      f"--listen-address={ACME_IP}", "--port=53", "--pid-file=", "--user=root",
                      f"--address=/example.test/{SERVER_IP}",
                      "--address=/elsewhere.test/198.51.100.99"], name="dnsmasq")
    del dns
    cert, key, _ = make_cert([x509.IPAddress(ipaddress.ip_address(ACME_IP))], ca=True)
    (tmp / "pebble.crt").write_bytes(cert)
    (tmp / "pebble.key").write_bytes(key)
    (tmp / "pebble.json").write_text(json.dumps({"pebble": {
        "listenAddress": f"{ACME_IP}:14000", "managementListenAddress": f"{ACME_IP}:15000",
        "certificate": str(tmp / "pebble.crt"), "privateKey": str(tmp / "pebble.key"),
        "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }}))
    pebble = host.popen(["pebble", "-config", str(tmp / "pebble.json"),
                         "-dnsserver", f"{ACME_IP}:53"], name="pebble",
                        extra_env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"})
    pebble.wait_for_line("ACME directory available", timeout=20)
    return pebble, str(tmp / "pebble.crt")


def pebble_root(lab: Lab, api_cert: str, tmp: Path) -> str:
    root = tmp / "pebble-root.pem"
    lab.visitor.check(["curl", "-sS", "--cacert", api_cert, "-o", str(root),
                       f"https://{ACME_IP}:15000/roots/0"])
    return str(root)


def served_cert(name: str, port: int = 443) -> str:
    """SHA-256 of the certificate the server presents for SNI `name` (not verified here)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((SERVER_IP, port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der
    return hashlib.sha256(der).hexdigest()


def curl(lab: Lab, *args: str, timeout: float = 60) -> tuple[int, str]:
    resolve = []
    for name in (NAME, "own.example.test", "other.example.test", "tls.example.test"):
        resolve += ["--resolve", f"{name}:443:{SERVER_IP}", "--resolve", f"{name}:80:{SERVER_IP}"]
    result = lab.visitor.run(["curl", "-sS", "--max-time", str(timeout), *resolve, *args],
                             timeout=timeout + 10)
    return result.returncode, result.stdout + result.stderr


def issued(pebble: Proc) -> int:
    return sum("Issued certificate serial" in line for line in pebble.lines())


# --- the test ------------------------------------------------------------------------------------


@pytest.fixture
def lab_resolver(lab: Lab) -> Iterator[None]:
    """The server host resolves names through the lab's dnsmasq, like Pebble (`ip netns exec`
    mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf for what it starts)."""
    resolv = Path("/etc/netns") / lab.server.ns
    resolv.mkdir(parents=True, exist_ok=True)
    (resolv / "resolv.conf").write_text(f"nameserver {ACME_IP}\n")
    try:
        yield
    finally:
        shutil.rmtree(resolv, ignore_errors=True)


def test_https_acme_and_own_certificates(lab: Lab, lab_resolver: None, tmp_path: Path) -> None:
    pebble, api_cert = start_acme_host(lab, tmp_path)
    acme_flags = ["--acme-directory", DIRECTORY, "--acme-ca-bundle", api_cert,
                  "--email", "ops@example.test"]
    server = start_server(lab, *acme_flags)
    lab.tunnel.popen([sys.executable, APP, "a", "127.0.0.1", "8081"],
                     name="app-a").wait_for_line("listening")

    # ACME HTTP-01 through port 80 of the server. (Pebble answers within a second or two, so
    # whether the tunnel shows progress meanwhile is checked on the failing order below.)
    tunnel = start_tunnel(lab, server.url(), "http://127.0.0.1:8081", f"https://{NAME}",
                          timeout=60)
    assert issued(pebble) == 1
    root = pebble_root(lab, api_cert, tmp_path)
    code, out = curl(lab, "--cacert", root, f"https://{NAME}/headers")
    assert code == 0, out
    seen = json.loads(out)
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert seen["app"] == "a" and headers["x-forwarded-proto"] == "https"
    assert (server.state_dir / "certs" / f"{NAME}.pem").stat().st_mode & 0o077 == 0

    # Port 80 redirects to https, except ACME challenges.
    code, out = curl(lab, "-i", f"http://{NAME}/some/path?q=1")
    assert out.startswith("HTTP/1.1 308"), out
    assert f"Location: https://{NAME}/some/path?q=1" in out
    code, out = curl(lab, "-i", f"http://{NAME}/.well-known/acme-challenge/unknown-token")
    assert out.startswith("HTTP/1.1 404"), out

    # A failed order tells the tunnel why, and leaves the rest of the server alone.
    failing = lab.tunnel.popen([WEFT, "tunnel", server.url(), "http://127.0.0.1:8081",
                                "https://nowhere.elsewhere.test"], name="failing")
    assert failing.wait(60) == 5
    # The CA reports a failed fetch; the server tells which: DNS points elsewhere.
    assert "DNS for nowhere.elsewhere.test points at 198.51.100.99, not at this server " \
        f"({SERVER_IP})" in failing.output(), failing.output()
    # While the CA tried, the tunnel showed what the server was doing (a progress line).
    assert re.search(r"^waiting  https://nowhere\.elsewhere\.test: the server is getting a "
                     r"certificate from .*acme-challenge", failing.output(), re.M), failing.output()
    assert curl(lab, "--cacert", root, "-o", "/dev/null", f"https://{NAME}/")[0] == 0

    # The tunnel's own certificate: a good pair is served; a mismatched key is refused.
    ca_pem, ca_key_pem, ca_cert = make_cert([], ca=True)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    leaf, leaf_key, _ = make_cert([x509.DNSName("own.example.test"),
                                   x509.DNSName("tls.example.test")], issuer=(ca_cert, ca_key))
    (tmp_path / "own.pem").write_bytes(leaf + leaf_key)
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    (tmp_path / "wrong.key").write_bytes(make_cert([])[1])
    (tmp_path / "leaf.pem").write_bytes(leaf)
    start_tunnel(lab, server.url(), "http://127.0.0.1:8081", "https://own.example.test",
                 "--tls-secret", str(tmp_path / "own.pem"), name="own")
    code, out = curl(lab, "--cacert", str(tmp_path / "ca.pem"), "https://own.example.test/headers")
    assert code == 0 and json.loads(out)["app"] == "a", out
    # A WebSocket upgrade over TLS.
    messages = [b"hello", os.urandom(5000), b"bye"]
    assert lab.visitor.call(websocket_echo, "own.example.test", messages,
                            str(tmp_path / "ca.pem")) == messages

    # https to https: the local server speaks TLS only, with a certificate for 127.0.0.1 from the
    # same CA, which the tunnel trusts (SSL_CERT_FILE) and verifies: re-encrypted, never plaintext.
    local, local_key, _ = make_cert([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                                    issuer=(ca_cert, ca_key))
    (tmp_path / "local.pem").write_bytes(local)
    (tmp_path / "local.key").write_bytes(local_key)
    lab.tunnel.popen([sys.executable, APP, "tls-app", "127.0.0.1", "8444",
                      str(tmp_path / "local.pem"), str(tmp_path / "local.key")],
                     name="tls-app").wait_for_line("listening")
    start_tunnel(lab, server.url(), "https://127.0.0.1:8444", "https://tls.example.test",
                 "--tls-secret", str(tmp_path / "own.pem"), name="tls-to-tls",
                 extra_env={"SSL_CERT_FILE": str(tmp_path / "ca.pem")})
    code, out = curl(lab, "--cacert", str(tmp_path / "ca.pem"), "https://tls.example.test/headers")
    assert code == 0, out
    seen = json.loads(out)
    assert seen["app"] == "tls-app"
    assert {k.lower(): v for k, v in seen["headers"]}["x-forwarded-proto"] == "https"

    bad = lab.tunnel.popen([WEFT, "tunnel", server.url(), "http://127.0.0.1:8081",
                            "https://other.example.test", "--tls-cert", str(tmp_path / "leaf.pem"),
                            "--tls-key", str(tmp_path / "wrong.key")], name="bad-key")
    assert bad.wait(30) == 2
    assert "does not match the certificate" in bad.output()
    assert issued(pebble) == 1  # neither touched the CA

    # Restart: the stored certificate is served again without a new order. The restarted
    # server's renewal window opens a few seconds later, while a long download is running.
    before = lab.visitor.call(served_cert, NAME)
    not_after = x509.load_pem_x509_certificate(
        (server.state_dir / "certs" / f"{NAME}.pem").read_bytes()).not_valid_after_utc
    mark = tunnel.mark()
    server.proc.terminate()
    remaining = not_after - datetime.datetime.now(datetime.UTC)
    renew_days = (remaining - datetime.timedelta(seconds=15)).total_seconds() / 86400
    restarted = lab.server.popen([*server.args, "--acme-renew-before",
                                  f"{renew_days:.9f}", "--acme-check-interval", "0.5"],
                                 name="server2")
    restarted.wait_for_line(r"weft tunnel weft://", timeout=20)
    wait_ready(tunnel, 1, timeout=40, after=mark)
    assert lab.visitor.call(served_cert, NAME) == before
    assert issued(pebble) == 1
    assert any("reusing the stored certificate" in line for line in restarted.lines())

    download = lab.visitor.popen(
        ["sh", "-c", f"curl -sS --max-time 60 --resolve {NAME}:443:{SERVER_IP} --cacert {root} "
         f"'https://{NAME}/download?size=8000000&delay=25' | sha256sum"], name="download")
    restarted.wait_for_line(r"certificate for \S+ renewed", timeout=40)
    after = lab.visitor.call(served_cert, NAME)
    assert after != before
    assert issued(pebble) == 2
    assert download.returncode is None, "the download should still be running"
    assert download.wait(60) == 0
    pattern = bytes(i % 251 for i in range(251 * 1024))
    assert download.output().split()[0] == hashlib.sha256((pattern * 32)[:8_000_000]).hexdigest()
    code, out = curl(lab, "--cacert", root, f"https://{NAME}/headers")
    assert code == 0 and json.loads(out)["app"] == "a"

    # weft probe on the server host, with the lab's resolver.
    good = lab.server.run([WEFT, "probe", NAME, "--state-dir", str(server.state_dir)])
    assert good.returncode == 0, good.stdout + good.stderr
    assert "DNS   ok" in good.stdout and "HTTP  ok" in good.stdout
    assert "running weft server" in good.stdout
    bad_dns = lab.server.run([WEFT, "probe", "x.elsewhere.test", "--state-dir",
                              str(server.state_dir), "--timeout", "2"])
    assert bad_dns.returncode == 1
    assert "DNS   WARN" in bad_dns.stdout and "HTTP  FAIL" in bad_dns.stdout
