"""The plugin host: loads plugins from the `weft` entry-point group and indexes their protocols."""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .errors import UsageError
from .protocol import TunnelProtocol

log = logging.getLogger("weft.plugins")

ENTRY_POINT_GROUP = "weft"
hookimpl = pluggy.HookimplMarker("weft")

# Where to get a scheme nobody serves yet: named in the error, so the fix is one command away.
KNOWN_PACKAGES = {
    "tcp": "weft-tcp",
    "udp": "weft-udp",
    "http": "weft-http",
    "https": "weft-http",
}


@attrs.frozen
class PluginInfo:
    name: str
    distribution: str
    version: str
    schemes: tuple[str, ...]


class PluginHost:
    """The pluggy manager plus the index of protocols by scheme."""

    def __init__(
        self, manager: pluggy.PluginManager, distributions: dict[str, tuple[str, str]]
    ) -> None:
        self.pm = manager
        self.hook = manager.hook
        self.protocols: dict[str, TunnelProtocol] = {}
        self._owner: dict[str, str] = {}
        self._distributions = distributions
        # Call each implementation ourselves so we know which plugin registered which scheme.
        for impl in reversed(manager.hook.weft_register_protocols.get_hookimpls()):

            def register(protocol: Any, _name: str = impl.plugin_name) -> None:
                self._register(protocol, _name)

            self._guarded(impl, register=register)

    def _guarded(self, impl: Any, **kwargs: Any) -> Any:
        try:
            return impl.function(**kwargs)
        except Exception as exc:  # one broken plugin must not take Weft down
            log.warning("plugin %s failed in %s: %s", impl.plugin_name, impl.function.__name__, exc)
            return None

    def call_each(self, hook_name: str, **kwargs: Any) -> None:
        """Call every implementation of `hook_name`; a plugin that raises is logged and skipped."""
        for impl in reversed(getattr(self.hook, hook_name).get_hookimpls()):
            self._guarded(impl, **kwargs)

    def _register(self, protocol: Any, plugin_name: str) -> None:
        scheme = protocol.scheme.lower()
        if scheme in self.protocols:
            log.warning(
                "scheme %s:// is served by both %s and %s; keeping %s",
                scheme,
                self._owner[scheme],
                plugin_name,
                self._owner[scheme],
            )
            return
        self.protocols[scheme] = protocol
        self._owner[scheme] = plugin_name

    def protocol(self, scheme: str) -> TunnelProtocol:
        """The protocol for `scheme`, or a UsageError naming the package that would serve it."""
        found = self.protocols.get(scheme.lower())
        if found is not None:
            return found
        package = KNOWN_PACKAGES.get(scheme.lower())
        served = ", ".join(f"{s}://" for s in sorted(self.protocols)) or "none"
        hint = (
            f"install it with: pip install {package}"
            if package
            else "install a plugin that serves it (see `weft plugins` and docs/plugins.md)"
        )
        raise UsageError(f"no installed plugin serves {scheme}:// URLs ({hint}); served: {served}")

    def plugins(self) -> list[PluginInfo]:
        infos = []
        for name, _plugin in self.pm.list_name_plugin():
            dist, version = self._distributions.get(name, ("-", "-"))
            schemes = tuple(sorted(s for s, owner in self._owner.items() if owner == name))
            infos.append(PluginInfo(name=name, distribution=dist, version=version, schemes=schemes))
        return sorted(infos, key=lambda info: info.name)


def load_plugins(extra: list[object] | None = None) -> PluginHost:
    """A plugin host with every installed `weft` entry point loaded (plus `extra`, for tests)."""
    pm = pluggy.PluginManager("weft")
    pm.add_hookspecs(hookspecs)
    distributions: dict[str, tuple[str, str]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not take Weft down
            log.warning("plugin %s (%s) failed to load: %s", ep.name, ep.value, exc)
            continue
        if pm.is_registered(plugin) or pm.has_plugin(ep.name):
            continue
        pm.register(plugin, name=ep.name)
        if ep.dist is not None:
            distributions[ep.name] = (ep.dist.name, ep.dist.version)
    for plugin in extra or ():
        pm.register(plugin)
    return PluginHost(pm, distributions)
