"""How many client connections a gRPC server holds, read from gRPC core's channelz.

grpc.aio tells no connection count, but gRPC core keeps a channelz node for each
server and for each of its open connections anyway (channelz is on by default, and
the ingress turns it on explicitly). grpcio exposes those nodes as JSON through
``grpc._cython.cygrpc.channelz_*``, the functions the ``grpcio-channelz`` servicer is
a thin wrapper over; reading them here saves a dependency for two calls. They are
read at scrape time only, so the request path pays nothing. Should a grpcio release
change them, the count becomes unknown (None, and the gauge is left out), never an
error.
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("streamwise.ingress")

try:
    from grpc._cython import cygrpc as _cygrpc
except ImportError:  # pragma: no cover - grpcio without its Cython core is not grpcio
    _cygrpc = None

_MAX_PAGES = 1000  # channelz returns at most a few hundred entries a page


def _pages(fetch: Any, key: str, id_key: str) -> list[dict[str, Any]] | None:
    """Every entry of a paginated channelz listing; None if channelz does not answer."""
    entries: list[dict[str, Any]] = []
    start = 0
    try:
        for _ in range(_MAX_PAGES):
            page = json.loads(fetch(start))
            found = page.get(key, [])
            entries.extend(found)
            if page.get("end", True) or not found:
                return entries
            start = max(int(_ref(e)[id_key]) for e in found) + 1
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        log.debug("channelz did not answer: %r", exc)
        return None
    return entries


def _ref(entry: dict[str, Any]) -> dict[str, Any]:
    return entry.get("ref", entry)  # servers nest their ids under "ref"; socket refs are flat


def server_ids() -> set[int]:
    """The channelz ids of every gRPC server of this process (empty if unknown)."""
    if _cygrpc is None:
        return set()
    servers = _pages(lambda start: _cygrpc.channelz_get_servers(start), "server", "serverId")
    return {int(_ref(s)["serverId"]) for s in servers or ()}


def created_since(before: set[int]) -> int | None:
    """The id of the one server made since ``before`` was taken, or None if not one.

    Call it right after creating the server, on the same thread: nothing else of
    streamwise makes a server in between.
    """
    new = server_ids() - before
    if len(new) != 1:
        log.debug("cannot tell the ingress's channelz node among %s: no connections gauge", sorted(new))
        return None
    return new.pop()


def open_connections(server_id: int) -> int | None:
    """Client connections the server ``server_id`` has open now; None if unknown."""
    if _cygrpc is None:
        return None
    sockets = _pages(
        lambda start: _cygrpc.channelz_get_server_sockets(server_id, start, 0), "socketRef", "socketId"
    )
    return None if sockets is None else len(sockets)
