"""``@coalesce``: how one stream's yielded items are grouped into wire frames."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from streamwise.actors._methods import COALESCE_ATTR, kind_of
from streamwise.config import CoalesceConfig
from streamwise.exceptions import UsageError

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["CoalesceConfig", "coalesce"]


def coalesce(
    *, max_items: int | None = None, max_delay_s: float = 0.0, max_bytes: int | None = None
) -> Callable[[F], F]:
    """Shape the frames a generator method's stream travels in; knobs checked here.

    ``max_items`` / ``max_bytes`` cap one frame (an item larger than ``max_bytes``
    travels alone); ``max_delay_s > 0`` lets the replica hold an item up to that long
    so that a frame fills, never longer. Without this decorator a method uses its
    deployment's ``coalesce`` option, whose default adds no latency. The function is
    returned unchanged (marked), so it can sit above or below ``@batch``.
    """
    try:
        policy = CoalesceConfig(max_items=max_items, max_delay_s=max_delay_s, max_bytes=max_bytes)
    except UsageError as exc:
        raise UsageError(f"@coalesce: {exc}") from None

    def mark(fn: F) -> F:
        if not callable(fn) or not kind_of(fn).is_stream:
            raise UsageError(
                f"@coalesce shapes the frames of a stream; {getattr(fn, '__qualname__', fn)!r} "
                "is not a generator function"
            )
        setattr(fn, COALESCE_ATTR, policy)
        return fn

    return mark
