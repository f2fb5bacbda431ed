# The Weft server in a container. Run with the capabilities WireGuard and nftables need and the
# host's network, so public ports are the host's:
#   docker build -t weft .
#   docker run -d --name weft --network host --cap-add NET_ADMIN --device /dev/net/tun \
#       -v weft-state:/var/lib/weft weft --bind-ips 198.51.100.1
#   docker logs weft        # shows the connection secret and the `weft tunnel` command
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        wireguard-go wireguard-tools nftables iproute2 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY weft_core ./weft_core
COPY plugins ./plugins
# gcc only while installing: it builds weft_http's compiled fast path (optional; a sixth to a
# third less CPU per proxied HTTP request in bench/bench_http.py), then goes.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir . ./plugins/weft_tcp ./plugins/weft_udp ./plugins/weft_http \
    && python -c "import weft_http._h1c" \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

VOLUME /var/lib/weft
# Control API (TCP), WireGuard (UDP), HTTP and HTTPS virtual hosts.
EXPOSE 9092/tcp 9093/udp 80/tcp 443/tcp
STOPSIGNAL SIGTERM
ENTRYPOINT ["weft", "server", "--state-dir", "/var/lib/weft"]
