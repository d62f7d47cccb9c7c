"""The two transports of a handle call: by reference (object store) and by value (gRPC).

*By value* (``handle.options(by_reference=False)``): arguments, results and stream
items are encoded with the chosen codec and sent inline, each at most
``grpc_max_message_length`` bytes (MessageTooLargeError otherwise). A
DeploymentResponse argument is awaited, and its value encoded, in the caller.

*By reference* (the default): the request carries the ``sw-ref`` metadata entry and
every payload is an envelope (see ``_payload``): parts of at least the threshold live
in shared memory, smaller payloads stay inline. A DeploymentResponse argument is
passed on as its result's envelope (a ref), never decoded in the caller; the callee
decodes it. With msgpack or orjson a large payload still travels as one stored part,
but refs inside values and zero-copy buffers need a pickle codec.

Input streams (items sent *to* a replica) travel by value on both transports.

Lifetime of what travels: the caller holds the segments of its arguments until the
call ends, and the callee takes its own holds while decoding them, before any user
code runs. For results, the caller names its call in the request (an *anchor*: a
byte of the session lock it keeps read-locked while the call runs, shared by up to 64
calls, and a call number); the callee pins every segment of a result (a hard link
named after the call) before sending it, and the caller drops each pin once it holds
the segment. A call that ends early (cancelled, failed, replica died) removes its
remaining pins; a callee that finishes after its caller's anchor was released removes
the pins it made; releasing an anchor sweeps pins any of its calls left behind.

Between nodes (caller and callee in different store sessions) segments cannot be
named: their bytes travel as chunks on the call's own RPCs (see ``_carry``). The
receiving side writes them into its session; results are then pinned under the
caller's call exactly as above (``ChunkReceiver``), and arguments are held by the
callee until its call ends (``receive_args``).
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from streamwise import codec as codecs
from streamwise.config import HandleOptions, TransportConfig, env_transport_config
from streamwise.exceptions import MessageTooLargeError, SerializationError
from streamwise.objectstore._carry import EXPORTS, Incoming, chunk_envelope, encode_for_node, is_chunked, ticket_of
from streamwise.objectstore._payload import CODEC_IDS, PICKLE_CODECS, Payload, encode
from streamwise.objectstore._process import current_store
from streamwise.objectstore._store import Store
from streamwise.objectstore.ref import ObjectRef, ref_of

# Request metadata of a by-reference call: "<threshold>:<anchor>:<call>:<session>",
# the last the caller's store session (a callee in another one sends results with
# their bytes inside, see ``_payload.carry``). Set only by
# CallerWire: a request carrying it is decoded as an envelope and then unpickled, so
# nothing may copy external (client) metadata into a CallRequest under this key.
REF_KEY = "sw-ref"
# Request metadata of a by-reference call to another node's store session over a
# path that reads chunks (CallCarried, Stream, Channel over gRPC): the callee may
# answer with chunked envelopes (see ``_carry``). Set only by ``carried_request``.
CHUNKS_KEY = "sw-chunks"


def _check_size(data: bytes, what: str, limit: int) -> bytes:
    if len(data) > limit:
        raise MessageTooLargeError(what, len(data), limit)
    return data


class _Resolved:
    """A DeploymentResponse argument, passed on as its result's ref: the callee
    decodes the value before the user method runs."""

    __slots__ = ("ref",)

    def __init__(self, ref: ObjectRef) -> None:
        self.ref = ref

    def __reduce__(self) -> tuple[Any, ...]:
        return _value_of_ref, (self.ref,)


def _value_of_ref(ref: ObjectRef) -> Any:
    return ref._payload.value()


class CallerWire:
    """The caller's side of one handle call: encodes arguments, decodes results.

    ``begin`` and ``end`` bracket the call on the core loop; everything the call
    carries stays alive in between.
    """

    __slots__ = ("by_reference", "threshold", "_limit", "_request", "_response", "_sent", "_call", "_store")

    def __init__(
        self,
        options: HandleOptions,
        request_codec: codecs.Codec,
        response_codec: codecs.Codec,
        config: TransportConfig | None = None,
    ) -> None:
        config = config or env_transport_config()
        self.by_reference = config.by_reference if options.by_reference is None else options.by_reference
        self.threshold = options.by_reference_threshold_bytes or config.by_reference_threshold_bytes
        self._limit = config.grpc_max_message_length
        self._request = request_codec
        self._response = response_codec
        self._sent: list[Payload] = []
        self._call = (0, 0)  # (anchor, call number) while the call runs
        self._store: Store | None = None

    # -- arguments -----------------------------------------------------------------

    def encode_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        if not self.by_reference:
            return _check_size(self._request.dumps([args, kwargs]), "call arguments", self._limit)
        payload = encode(current_store(), [args, kwargs], self._request.name, self.threshold)
        self._sent.append(payload)
        return _check_size(payload.to_wire(), "call arguments", self._limit)

    async def encode_pending(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        """Encode arguments that include DeploymentResponses (already running).

        By reference with a pickle codec, each is passed on as a ref to its result;
        otherwise its value is awaited here. Cancelling cancels nothing upstream.
        """
        passed_on = self.by_reference and self._request.name in PICKLE_CODECS

        async def resolve(value: Any) -> Any:
            if not _is_response(value):
                return value
            if passed_on:
                raw = await value._raw()
                return _Resolved(ref_of(raw)) if isinstance(raw, Payload) else raw
            return await value

        resolved_args = tuple([await resolve(a) for a in args])
        resolved_kwargs = {k: await resolve(v) for k, v in kwargs.items()}
        return self.encode_args(resolved_args, resolved_kwargs)

    def encode_input(self, items: list[Any]) -> bytes:
        return _check_size(self._request.dumps(items), "a streamed input item", self._limit)

    # -- the call ------------------------------------------------------------------

    def begin(self, metadata: Any) -> None:
        if self.by_reference:
            self._store = store = current_store()
            self._call = anchor, call = store.open_call()
            metadata[REF_KEY] = f"{self.threshold}:{anchor}:{call}:{store.session.name}"

    def end(self, complete: bool) -> None:
        """The call is over; ``complete``: every result it sent was decoded here."""
        (anchor, call), self._call = self._call, (0, 0)
        if anchor and self._store is not None:
            self._store.close_call(anchor, call, complete)
        self._sent.clear()

    # -- results -------------------------------------------------------------------

    def receive(self, data: bytes) -> Any:
        """A unary result: its held envelope (by reference, decoded on demand, so it
        can be passed on undecoded) or its value (by value)."""
        if not self.by_reference:
            return self._response.loads(data)
        return Payload.from_wire(current_store(), data, self._call)

    def decode_items(self, data: bytes) -> list[Any]:
        """The items of one stream frame."""
        if not self.by_reference:
            return self._response.loads(data)
        return Payload.from_wire(current_store(), data, self._call).value()


def carried_request(request: Any) -> tuple[Any, list[memoryview]]:
    """A copy of a by-reference ``request`` for a replica of another node's session,
    and the chunks to send right after it: its arguments become a chunked envelope
    when they name segments (the caller still holds them: see CallerWire)."""
    carried = type(request)()
    carried.CopyFrom(request)
    outgoing = chunk_envelope(current_store(), request.args)
    carried.args = outgoing.envelope
    carried.metadata[CHUNKS_KEY] = "1"
    return carried, list(outgoing.chunks())


async def receive_args(request: Any, read: Callable[[], Awaitable[Any]]) -> Callable[[], None] | None:
    """In a replica: when ``request`` (from another node) has a chunked envelope as
    its arguments, read their chunks (``read()`` returns each chunk's bytes, or
    something else if the caller stopped sending) into this node's store and make
    ``request.args`` the envelope naming them; returns what releases them once the
    arguments are decoded (None if there was nothing to read). Cancelling removes
    what was partly written."""
    if request.codec not in CODEC_IDS or REF_KEY not in request.metadata or CHUNKS_KEY not in request.metadata:
        return None
    if not is_chunked(request.args):
        return None
    store = current_store()
    incoming = Incoming(store, request.args)
    try:
        while incoming.needed:
            chunk = await read()
            if not isinstance(chunk, memoryview):
                raise SerializationError("streamwise", "the arguments' chunks are missing")
            incoming.feed(chunk)
        request.args, holds = incoming.finish_held()
    finally:
        incoming.abort()

    def release() -> None:
        for held in holds:
            store.release(held)

    return release


class ChunkReceiver:
    """Where the chunked envelopes of one carried call's replies land: this process's
    store, each part pinned under the call (so the caller's ``CallerWire`` decodes
    them as usual, and a call that ends early clears them)."""

    __slots__ = ("_call", "_seqs")

    def __init__(self, request: Any) -> None:
        _, anchor, call, _ = request.metadata[REF_KEY].split(":")
        self._call = (int(anchor), int(call))
        self._seqs = itertools.count(1)

    @staticmethod
    def begin(envelope: bytes) -> Incoming | None:
        """An Incoming for ``envelope`` if its bytes follow in chunks, else None."""
        return Incoming(current_store(), envelope) if is_chunked(envelope) else None

    @staticmethod
    def fetch(envelope: bytes) -> tuple[bytes, Incoming] | None:
        """(ticket, Incoming) if ``envelope`` is a fetch envelope, else None."""
        ticket = ticket_of(envelope)
        return None if ticket is None else (ticket, Incoming(current_store(), envelope))

    def finish(self, incoming: Incoming) -> bytes:
        """The envelope to decode, once ``incoming`` has all its bytes."""
        return incoming.finish(*self._call, self._seqs)


def take_export(ticket: bytes) -> list[memoryview] | None:
    """The chunks of a result waiting for the Fetch naming ``ticket`` (once), or None."""
    outgoing = EXPORTS.take(ticket)
    return None if outgoing is None else list(outgoing.chunks())


def decode_result(raw: Any) -> Any:
    """The value of what ``CallerWire.receive`` returned."""
    return raw.value() if isinstance(raw, Payload) else raw


def object_ref_of(raw: Any) -> ObjectRef:
    """The ObjectRef of a by-reference call's result."""
    if isinstance(raw, Payload):
        return ref_of(raw)
    from streamwise.objectstore.ref import put  # a result that arrived as a value

    return put(raw)


def _is_response(value: Any) -> bool:
    from streamwise.routing.response import DeploymentResponse  # routing imports this module

    return isinstance(value, DeploymentResponse)


# -- the replica's side ----------------------------------------------------------------


class ServerWire:
    """The replica's side of one call; ``close()`` when the call is over.

    Building one never fails: a bad codec name or metadata entry raises from the
    first encode or decode, inside the servicer's error handling.
    """

    def __init__(
        self, metadata: Mapping[str, str], request_codec: str, response_codec: str, *, push: bool = True
    ) -> None:
        self._codec_names = (request_codec, response_codec)
        self._spec = metadata.get(REF_KEY)
        self.by_reference = self._spec is not None
        self._limit = env_transport_config().grpc_max_message_length
        self._pins = 0
        self._call = (0, 0)
        # The caller reads chunks after each message (another node's session), unless
        # the RPC cannot send any (``push`` false: a unary Call, whose results are fetched).
        self.chunked = push and self._spec is not None and metadata.get(CHUNKS_KEY) == "1"
        self._carried: list[memoryview] = []

    @property
    def _request(self) -> codecs.Codec:
        return codecs.get_codec(self._codec_names[0])

    @property
    def _response(self) -> codecs.Codec:
        return codecs.get_codec(self._codec_names[1])

    def _parse_spec(self) -> tuple[int, tuple[int, int], str]:
        try:
            threshold, anchor, call, session = (self._spec or "").split(":")
            return int(threshold), (int(anchor), int(call)), session
        except ValueError:
            raise SerializationError("streamwise", f"bad {REF_KEY} metadata {self._spec!r}") from None

    def loads_args(self, data: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if not data:
            return (), {}
        if not self.by_reference:
            args, kwargs = self._request.loads(data)
        else:
            # Holds are taken here, before user code runs; the caller keeps its own
            # until the call ends, so the arguments never lack a holder.
            args, kwargs = Payload.from_wire(current_store(), data).value()
        return tuple(args), kwargs

    def dumps_result(self, value: Any) -> bytes:
        return self._dumps(value, "a call result")

    def dumps_items(self, items: list[Any]) -> bytes:
        """One frame of stream items. By value, only a single item over the limit is
        an error: frames that merely gather many small items may be larger."""
        if self.by_reference:
            return self._dumps(items, "")
        data = self._response.dumps(items)
        if len(data) > self._limit:
            for item in items:
                _check_size(self._response.dumps([item]), "a stream item", self._limit)
        return data

    def _dumps(self, value: Any, what: str) -> bytes:
        if not self.by_reference:
            return _check_size(self._response.dumps(value), what, self._limit)
        store = current_store()
        threshold, self._call, caller_session = self._parse_spec()
        if caller_session != store.session.name:
            # Another node: the bytes follow the envelope as chunks (see take_carried),
            # or wait here to be fetched, straight from the value's own buffers; nothing
            # is stored or pinned on this node.
            outgoing = encode_for_node(store, value, self._response.name, threshold)
            if not outgoing.pieces:
                return outgoing.envelope
            if self.chunked:
                self._carried += outgoing.chunks()
                return outgoing.envelope
            return EXPORTS.add(outgoing)
        payload = encode(store, value, self._response.name, threshold)
        if not payload.main and not payload.buffers and not payload.extra:
            return payload.to_wire()  # inline: nothing to pin
        # Our holds end with `payload` (when this returns); the pins keep each segment
        # alive until the caller holds it.
        pins: list[int] = []
        try:
            for _, held in payload.parts():
                self._pins += 1
                store.pin(held, *self._call, self._pins)
                pins.append(self._pins)
            return payload.to_wire(pins)
        except BaseException:
            for seq, (part, _) in zip(pins, payload.parts()):
                store.session.unpin(*self._call, seq, part.segid, part.size)
            raise

    # The replica servicer's Payload protocol (streamwise.streaming.payload).
    args = loads_args
    value = dumps_result
    items = dumps_items

    def take_carried(self) -> list[memoryview]:
        """The chunks to send right after the message holding the last envelope made
        (empty unless the caller is on another node); they stay valid on their own."""
        carried, self._carried = self._carried, []
        return carried

    def inputs(self, data: bytes) -> list[Any]:
        """Items of an input stream: they always travel by value."""
        return self._request.loads(data)

    def close(self) -> None:
        """If the caller's anchor is already released, remove the pins it will never read."""
        if self._pins:
            store = current_store()
            if not store.anchor_alive(self._call[0]):
                store.session.clear_pins(*self._call)
