"""Routers: one file per routing method, each registering itself by name.

``build_router(name, **config)`` builds one (``parse_router_spec`` reads ``"name?key=value&…"``), ``list_routers()``
names them all. Every module in this package is
imported here, so adding a router means adding one file and touching no other.
"""

from __future__ import annotations

import importlib
import pkgutil

from moerge.routing.router import (
    Router,
    RouterContext,
    build_router,
    list_routers,
    parse_router_spec,
    register_router,
    router_class,
)

__all__ = ["Router", "RouterContext", "build_router", "list_routers", "parse_router_spec", "register_router",
           "router_class"]

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
