"""http:// and https:// routes: shared virtual hosts by Host and SNI, TLS, certificates over ACME.

    weft tunnel weft://SECRET@198.51.100.1 http://127.0.0.1:8080 https://app.example.com

See docs/http.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from weft_core import (
    ApiError,
    Published,
    Route,
    ServerContext,
    TcpForwarder,
    TunnelContext,
    UsageError,
    hookimpl,
)
from weft_core.urls import is_ip_address

from . import h1, vhost
from .certs import CertificateError, check_pair, load_secret_files, server_context
from .forwarder import TlsForwarder

if TYPE_CHECKING:
    from . import acme_certs

# `acme` (with requests/urllib3) costs ~0.4 s and ~7 MB per process: `acme_certs` is imported
# only when an https:// route needs a certificate over ACME.
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"

LOCAL_DEFAULT_PORTS = {"http": 80, "https": 443}
DNS_HINT_TIMEOUT = 5.0  # resolving a failed order's name on the server, to tell DNS from port 80


def _limits(options: argparse.Namespace) -> vhost.HttpLimits:
    return vhost.HttpLimits(
        http_port=getattr(options, "http_port", 80),
        https_port=getattr(options, "https_port", 443),
        header_timeout=getattr(options, "http_header_timeout", 10.0),
        keepalive_timeout=getattr(options, "http_keepalive_timeout", 75.0),
        max_header=getattr(options, "http_max_header_size", h1.MAX_HEAD),
        idle_timeout=getattr(options, "idle_timeout", 3600.0),
    )


def acme_settings(options: argparse.Namespace) -> acme_certs.AcmeSettings:
    from . import acme_certs

    directory = getattr(options, "acme_directory", None) or (
        LETS_ENCRYPT_STAGING if getattr(options, "acme_staging", False) else LETS_ENCRYPT)
    bundle = getattr(options, "acme_ca_bundle", None)
    renew_days = getattr(options, "acme_renew_before", None)
    return acme_certs.AcmeSettings(
        directory=directory,
        ca_bundle=str(bundle) if bundle else None,
        email=getattr(options, "email", None),
        renew_before=None if renew_days is None else datetime.timedelta(days=renew_days),
        check_interval=getattr(options, "acme_check_interval", 3600.0),
        timeout=getattr(options, "acme_timeout", 90.0),
    )


class HttpProtocol:
    """http:// routes (and, as a subclass, https://)."""

    scheme = "http"
    transport = "tcp"
    local_schemes = ("http", "https", "tcp")

    # --- tunnel side -------------------------------------------------------------------------

    def validate(self, route: Route) -> Route:
        local, remote = route.local, route.remote
        if local.scheme not in self.local_schemes:
            raise UsageError(f"an {self.scheme}:// route forwards to an http://, https:// or "
                             f"tcp:// local URL, not {local}")
        if local.port is None:
            if local.scheme == "tcp":
                raise UsageError(f"local URL {local} needs a port, like tcp://127.0.0.1:8080")
            local = local.with_port(LOCAL_DEFAULT_PORTS[local.scheme])
        if local.port == 0:
            raise UsageError(f"local URL {local} needs a port other than 0")
        if local.path:
            raise UsageError(f"local URL {local}: paths are not supported; give scheme, host "
                             "and port only")
        if not local.host:
            local = local.with_host("127.0.0.1")
        name = h1.normalize_host(remote.host) if remote.host else None
        if name is None or is_ip_address(name):
            raise UsageError(f"remote URL {remote} needs a DNS name, like "
                             f"{self.scheme}://app.example.com")
        if remote.path:
            raise UsageError(f"remote URL {remote}: paths are not supported")
        return Route(local, remote.with_host(name), route.options)

    def validate_proxy(self, route: Route) -> Route:
        """`weft proxy http://ADDR:PORT LOCAL`: the tunnel-side forwarder on a local address."""
        if self.scheme == "https":
            raise UsageError("weft proxy accepts plain http:// here: it does not terminate TLS")
        named = self.validate(Route(route.local, route.remote.with_host("proxy.invalid")))
        return Route(named.local, route.remote, route.options)

    def route_options(self, route: Route, options: argparse.Namespace) -> dict[str, Any]:
        return {}

    async def open_tunnel_forwarder(self, route: Route, ctx: TunnelContext) -> tuple[Any, int]:
        listen = ctx.wireguard_net.listen_tcp(ctx.address, ctx.listen_port)
        assert route.local.port is not None
        target = (route.local.host, route.local.port)
        forwarder: TcpForwarder | TlsForwarder
        if route.local.scheme == "https":
            forwarder = TlsForwarder(
                f"{ctx.tunnel_name} {route.local}", listen, ctx.local_net, target,
                insecure=bool(getattr(ctx.options, "local_insecure", False)),
                idle_timeout=ctx.options.idle_timeout, on_close=ctx.connection_closed,
            )
        else:
            forwarder = TcpForwarder(
                f"{ctx.tunnel_name} {route.local}", listen, ctx.local_net, target,
                idle_timeout=ctx.options.idle_timeout, on_close=ctx.connection_closed,
            )
        await forwarder.start()
        return forwarder, forwarder.address[1]

    # --- server side -------------------------------------------------------------------------

    def _name_and_site(self, route: Route, ctx: ServerContext) -> tuple[str, vhost.Site]:
        limits = _limits(ctx.options)
        name = h1.normalize_host(route.remote.host)
        if name is None or is_ip_address(name):
            raise ApiError(400, "bad_name", f"{route.remote}: the remote host must be a DNS name")
        wanted = limits.https_port if self.scheme == "https" else limits.http_port
        if route.remote.port not in (None, wanted):
            raise ApiError(400, "bad_port", f"{route.remote}: this server serves {self.scheme}:// "
                           f"virtual hosts on port {wanted} only (--{self.scheme}-port)")
        state_dir = getattr(ctx, "state_dir", None)
        site = vhost.site_for(ctx.bind_address, ctx.net, limits, state_dir)
        return name, site

    def _public(self, name: str, port: int, default: int) -> str:
        return f"{self.scheme}://{name}" + ("" if port == default else f":{port}")

    async def open_server_endpoint(self, route: Route, ctx: ServerContext) -> Published:
        name, site = self._name_and_site(route, ctx)
        owner = f"{ctx.tunnel_name}@{ctx.tunnel_address}"
        site.check_free(name, owner)
        endpoint = vhost.VhostRoute(site, name, "http", owner, ctx.wireguard_net,
                                    (ctx.tunnel_address, ctx.forwarder_port), ctx.connection_closed)
        try:
            await site.ensure_http()
        except ApiError:
            if not site.http and not site.https and not site.pending:
                await site.close()
            raise
        site.add(endpoint)
        remote = route.remote.with_host(name)
        return Published(endpoint=endpoint,
                         public_url=self._public(name, site.limits.http_port, 80), remote=remote)


class HttpsProtocol(HttpProtocol):
    scheme = "https"

    def route_options(self, route: Route, options: argparse.Namespace) -> dict[str, Any]:
        secret = getattr(options, "tls_secret", None)
        cert = getattr(options, "tls_cert", None)
        key = getattr(options, "tls_key", None)
        if secret is None and cert is None and key is None:
            return {}
        if secret is not None and (cert is not None or key is not None):
            raise UsageError("give either --tls-secret or --tls-cert with --tls-key, not both")
        if secret is None and (cert is None or key is None):
            raise UsageError("--tls-cert and --tls-key go together")
        try:
            chain, key_pem = load_secret_files(secret, cert, key)
            check_pair(chain, key_pem, route.remote.host)
        except OSError as exc:
            raise UsageError(f"cannot read the certificate: {exc}") from None
        except CertificateError as exc:
            raise UsageError(f"{route.remote}: refusing the certificate: {exc}") from None
        return {"tls_chain": chain.decode(), "tls_key": key_pem.decode()}

    async def open_server_endpoint(self, route: Route, ctx: ServerContext) -> Published:
        name, site = self._name_and_site(route, ctx)
        owner = f"{ctx.tunnel_name}@{ctx.tunnel_address}"
        site.check_free(name, owner)
        if name in site.pending:
            raise ApiError(409, "name_in_use", f"a certificate for {name} is being obtained")
        endpoint = vhost.VhostRoute(site, name, "https", owner, ctx.wireguard_net,
                                    (ctx.tunnel_address, ctx.forwarder_port), ctx.connection_closed)
        site.pending.add(name)
        site.owners.setdefault(name, owner)
        try:
            await site.ensure_http()  # redirects, and ACME challenges
            await site.ensure_https()
            context, unwatch = await self._certificate(route, ctx, name, site)
        except BaseException:
            site.pending.discard(name)
            if name not in site.http and name not in site.https:
                site.owners.pop(name, None)
            if not site.http and not site.https and not site.pending:
                await site.close()
            raise
        site.pending.discard(name)
        site.certs[name] = context
        site.add(endpoint)
        if unwatch is not None:
            endpoint.on_closed.append(unwatch)
        remote = route.remote.with_host(name)
        return Published(endpoint=endpoint,
                         public_url=self._public(name, site.limits.https_port, 443), remote=remote)

    async def _certificate(self, route: Route, ctx: ServerContext, name: str, site: vhost.Site
                           ) -> tuple[ssl.SSLContext, Any]:
        chain_text, key_text = route.options.get("tls_chain"), route.options.get("tls_key")
        if chain_text or key_text:
            if not isinstance(chain_text, str) or not isinstance(key_text, str):
                raise ApiError(400, "bad_certificate", "tls_chain and tls_key must be PEM text")
            try:
                info = check_pair(chain_text.encode(), key_text.encode(), name)
                context = server_context(chain_text.encode(), key_text.encode())
            except (CertificateError, ssl.SSLError, ValueError) as exc:
                raise ApiError(400, "bad_certificate", f"{name}: {exc}") from None
            ctx.log.info("https://%s: using the tunnel's certificate (valid until %s)",
                         name, info.not_after)
            return context, None
        state_dir = getattr(ctx, "state_dir", None)
        if state_dir is None:
            raise ApiError(422, "certificate_failed", "this server cannot keep ACME state")
        from . import acme_certs

        manager = acme_certs.manager_for(Path(state_dir), acme_settings(ctx.options))
        ctx.log.info("https://%s: obtaining a certificate from %s", name,
                     manager.settings.directory)
        # Shown by the waiting tunnel (an order takes seconds, a failing one up to a minute).
        ctx.progress(f"the server is getting a certificate from "
                     f"{urlsplit(manager.settings.directory).hostname}; the CA fetches "
                     f"http://{name}/.well-known/acme-challenge/... from port 80 of the server")
        try:
            stored, _new = await manager.obtain(name)
        except acme_certs.AcmeFailure as exc:
            reason = str(exc)
            if exc.fetch:  # wrong DNS or a closed port 80? The CA cannot say; this server can.
                from .probe import dns_hint

                with contextlib.suppress(TimeoutError):
                    hint = await asyncio.wait_for(
                        asyncio.to_thread(dns_hint, name, ctx.bind_address), DNS_HINT_TIMEOUT)
                    reason = f"{hint}. ({reason})" if hint else reason
            ctx.log.warning("https://%s: no certificate: %s", name, reason)
            raise ApiError(422, "certificate_failed",
                           f"no certificate for {name}: {reason}") from None

        def install(fresh: acme_certs.Stored) -> None:
            if name in site.certs:
                site.certs[name] = server_context(fresh.chain, fresh.key)

        unwatch = manager.watch(name, install, stored)
        return server_context(stored.chain, stored.key), unwatch


# --- hooks ---------------------------------------------------------------------------------------


@hookimpl
def weft_register_protocols(register: Any) -> None:
    register(HttpProtocol())
    register(HttpsProtocol())


@hookimpl
def weft_server_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("http:// and https:// virtual hosts (weft-http)")
    group.add_argument("--http-port", type=int, default=80, metavar="PORT",
                       help="shared port for http:// virtual hosts (default 80)")
    group.add_argument("--https-port", type=int, default=443, metavar="PORT",
                       help="shared port for https:// virtual hosts (default 443)")
    group.add_argument("--http-header-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="a request head must arrive within this (else 408; default 10)")
    group.add_argument("--http-keepalive-timeout", type=float, default=75.0, metavar="SECONDS",
                       help="close idle keep-alive visitor connections after this (default 75)")
    group.add_argument("--http-max-header-size", type=int, default=h1.MAX_HEAD, metavar="BYTES",
                       help=f"largest request head accepted (else 431; default {h1.MAX_HEAD})")
    which_ca = group.add_mutually_exclusive_group()  # both given: say so, never pick one
    which_ca.add_argument("--acme-directory", metavar="URL",
                          help="ACME directory URL (default: Let's Encrypt production)")
    which_ca.add_argument("--acme-staging", action="store_true",
                          help="use Let's Encrypt's staging directory (untrusted test "
                          "certificates)")
    group.add_argument("--acme-ca-bundle", type=Path, metavar="PATH",
                       help="trust this CA bundle for the ACME directory (private CAs)")
    group.add_argument("--email", metavar="ADDRESS",
                       help="contact address registered with the ACME account")
    group.add_argument("--acme-renew-before", type=float, default=None, metavar="DAYS",
                       help="renew certificates this long before they expire (default: when a "
                       "third of their lifetime is left, 30 days of Let's Encrypt's 90)")
    group.add_argument("--acme-check-interval", type=float, default=3600.0, metavar="SECONDS",
                       help="how often to look for certificates due for renewal (default 3600)")
    group.add_argument("--acme-timeout", type=float, default=90.0, metavar="SECONDS",
                       help="give up on a certificate order after this (default 90)")


@hookimpl
def weft_tunnel_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("http:// and https:// routes (weft-http)")
    group.add_argument("--tls-secret", type=Path, metavar="PATH",
                       help="PEM file with certificate chain and key for the https:// routes "
                       "(default: the server gets one over ACME)")
    group.add_argument("--tls-cert", type=Path, metavar="PATH",
                       help="PEM certificate chain (with --tls-key)")
    group.add_argument("--tls-key", type=Path, metavar="PATH", help="PEM private key")
    group.add_argument("--local-insecure", action="store_true",
                       help="do not verify the certificate of a local https:// service")


@hookimpl
def weft_register_commands(cli: Any) -> None:
    from . import probe

    cli.add_command("probe", "check that DOMAIN points at this server and that an ACME "
                    "HTTP-01 challenge served here is fetchable through it",
                    probe.configure, probe.run)


@hookimpl
def weft_server_stopping(server: Any) -> None:
    acme = sys.modules.get(f"{__name__}.acme_certs")  # nothing to stop if it was never imported
    if acme is not None:
        acme.stop_all()
