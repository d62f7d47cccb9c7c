"""The request context user code can read inside a replica: ``get_request_context()``."""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Mapping

from streamwise.streaming import _wire


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestContext:
    """Facts about the call being served: ids and routing hints from the caller."""

    request_id: str = ""
    deployment: str = ""
    replica_id: str = ""
    multiplexed_model_id: str = ""
    session_id: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], deployment: str, replica_id: str) -> RequestContext:
        return cls(
            request_id=metadata.get(_wire.REQUEST_ID, ""),
            deployment=deployment,
            replica_id=replica_id,
            multiplexed_model_id=metadata.get(_wire.MODEL_ID, ""),
            session_id=metadata.get(_wire.SESSION_ID, ""),
            metadata=dict(metadata),
        )


# What a request's context is built from; built only when user code asks for it.
_Source = tuple[Mapping[str, str], str, str]
_CURRENT: contextvars.ContextVar[_Source | RequestContext] = contextvars.ContextVar("streamwise_request")


def enter_request(metadata: Mapping[str, str], deployment: str, replica_id: str) -> None:
    """Make this request current for the running task (and tasks/threads it starts)."""
    _CURRENT.set((metadata, deployment, replica_id))


def current_deadline() -> float | None:
    """The deadline (seconds since the epoch) of the request being served, if it has one."""
    current = _CURRENT.get(None)
    if current is None:
        return None
    metadata = current.metadata if isinstance(current, RequestContext) else current[0]
    raw = metadata.get(_wire.DEADLINE)
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


def get_request_context() -> RequestContext:
    """The context of the request being served (an empty one outside a request)."""
    current = _CURRENT.get(None)
    if current is None:
        return RequestContext()
    if isinstance(current, RequestContext):
        return current
    context = RequestContext.from_metadata(*current)
    _CURRENT.set(context)  # later calls in this task reuse it
    return context
