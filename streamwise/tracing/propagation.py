"""W3C trace context (``traceparent`` / ``tracestate``) in a request's metadata map.

Every hop reads the caller's context from the request's metadata and writes its own
into the requests it makes (none for a new trace that is not sampled: see spans.py);
external gRPC clients' headers take the same path. The common case is parsed here
without the SDK's propagator, with the same result. Also here: the spans made current
in place of a real one when nothing is sampled: a caller's (UnsampledCaller) and a
new trace's (UNSAMPLED, UnsampledWithIds; used in spans.py).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, MutableMapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# W3C trace context is what crosses every hop, external clients' included; the
# global composite propagator would add a baggage pass per hop.
_W3C = TraceContextTextMapPropagator()

# A well-formed version-00 traceparent with valid (not all-zero) ids; anything else
# goes to the SDK's propagator. Its fields are at fixed offsets: trace id [3:35],
# span id [36:52], flags [53:55].
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
EMPTY = otel_context.Context()
# The key under which a context holds its span, found through the public API once.
_SPAN_KEY = next(iter(trace.set_span_in_context(trace.INVALID_SPAN, EMPTY)))
_FLAGS = {"00": TraceFlags(TraceFlags.DEFAULT), "01": TraceFlags(TraceFlags.SAMPLED)}


def extract(metadata: Mapping[str, str]) -> otel_context.Context:
    """The W3C trace context in ``metadata`` (an empty context when there is none)."""
    return parse(metadata)[0]


def parse(metadata: Mapping[str, str]) -> tuple[otel_context.Context, SpanContext | None, bool]:
    """The W3C trace context in ``metadata``: (context, parent, root).

    ``parent`` is the caller's span context when it is sampled, else None; ``root``
    says that there is no valid caller's span at all. Every hop does this once per
    request, sampled or not, so the common case (a version-00 traceparent without
    tracestate) is parsed here, and the ids of a caller's span that is not sampled
    only when asked for; the rest, including every malformed header, takes the SDK
    propagator's path with the same result.
    """
    header = metadata.get("traceparent")
    if header is None:
        return EMPTY, None, True
    if "tracestate" in metadata or _TRACEPARENT.fullmatch(header) is None:
        context = _W3C.extract(metadata)
        span_context = trace.get_current_span(context).get_span_context()
        if not span_context.is_valid:
            return context, None, True
        return context, span_context if span_context.trace_flags.sampled else None, False
    flags = header[53:]
    if flags == "00" or not int(flags, 16) & TraceFlags.SAMPLED:
        return otel_context.Context({_SPAN_KEY: UnsampledCaller(header)}), None, False
    span_context = remote(header[3:35], header[36:52], flags)
    return trace.set_span_in_context(NonRecordingSpan(span_context), EMPTY), span_context, False


def remote(trace_id: str, span_id: str, flags: str) -> SpanContext:
    """The caller's span context from the hex fields of a well-formed traceparent."""
    trace_flags = _FLAGS[flags] if flags in _FLAGS else TraceFlags(int(flags, 16))
    return SpanContext(int(trace_id, 16), int(span_id, 16), True, trace_flags)


class UnsampledCaller(NonRecordingSpan):
    """A caller's span that is not sampled, known by its well-formed version-00
    traceparent. Its ids are parsed only if asked for, and a call made under it passes
    the header on as it is."""

    _parsed: SpanContext | None = None  # a class default: set per instance only when needed

    def __init__(self, header: str) -> None:  # no super().__init__: _context is lazy
        self.header = header

    @property
    def _context(self) -> SpanContext:  # type: ignore[override]
        return self.get_span_context()

    def get_span_context(self) -> SpanContext:
        if self._parsed is None:
            header = self.header
            self._parsed = remote(header[3:35], header[36:52], header[53:55])
        return self._parsed


def inject(metadata: MutableMapping[str, str], span_context: SpanContext) -> None:
    """Write ``span_context`` as W3C traceparent (and tracestate, if any) into ``metadata``."""
    # %-formatting: an f-string formats TraceFlags (an int subclass) through __format__.
    metadata["traceparent"] = "00-%032x-%016x-%02x" % (span_context.trace_id, span_context.span_id, span_context.trace_flags)
    if span_context.trace_state:
        metadata["tracestate"] = span_context.trace_state.to_header()


def random_id(bits: int) -> int:
    """A random trace (128 bits) or span (64 bits) id."""
    return random.getrandbits(bits) or 1  # all-zero ids are invalid


# The span of a request whose new trace is not sampled (told apart by identity): no
# ids, and nothing about it crosses a hop (see spans.py).
UNSAMPLED = NonRecordingSpan(INVALID_SPAN_CONTEXT)


class UnsampledWithIds(NonRecordingSpan):
    """UNSAMPLED where the installed sampler is not streamwise's and so does not know
    it: the same, but with ids of its own, drawn when first asked for, so that any
    parent-based sampler drops what user code starts under it. They cross no hop."""

    _ids: SpanContext | None = None

    def __init__(self) -> None:  # no super().__init__: _context is lazy
        pass

    @property
    def _context(self) -> SpanContext:  # type: ignore[override]
        return self.get_span_context()

    def get_span_context(self) -> SpanContext:
        if self._ids is None:
            self._ids = SpanContext(random_id(128), random_id(64), False, TraceFlags(TraceFlags.DEFAULT))
        return self._ids
