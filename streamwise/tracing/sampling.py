"""The sampler the SDK is installed with: whole traces, decided where they start.

A span with a parent follows the parent's decision. A new trace is sampled with the
configured ratio, except under a request whose own new trace was not sampled (it is
current as :data:`streamwise.tracing.propagation.UNSAMPLED`, which has no ids): a span the
user's code starts while serving it is not sampled either, so that the request's
trace is dropped whole, as it would be were its ids passed on.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from streamwise.tracing.propagation import UNSAMPLED

_DROP = SamplingResult(Decision.DROP)


class _NewTraces(Sampler):
    """Samples a new trace with ``ratio``, none under an unsampled request."""

    def __init__(self, ratio: float) -> None:
        self._ratio = TraceIdRatioBased(ratio)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if trace.get_current_span(parent_context) is UNSAMPLED:
            return _DROP
        return self._ratio.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"{self._ratio.get_description()}, none under an unsampled request"


def sampler(ratio: float) -> Sampler:
    """Parent-based sampling of whole traces, new ones with ``ratio``."""
    return ParentBased(_NewTraces(ratio))
