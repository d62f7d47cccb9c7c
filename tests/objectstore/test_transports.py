"""Handle calls by reference (shared memory, the default) and by value (inline gRPC)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import streamwise
from streamwise.exceptions import MessageTooLargeError, RemoteError, UsageError

MB = 1_000_000  # above the default by-reference threshold (100 KiB)


def describe(value) -> dict:
    """Type of a received value and the file its bytes live in ("" for private memory)."""
    info = {"type": type(value).__name__, "file": "", "readonly": None}
    if isinstance(value, (bytes, bytearray, memoryview)) or hasattr(value, "__array_interface__"):
        import numpy as np

        array = value if hasattr(value, "ctypes") else np.frombuffer(value, dtype=np.uint8)
        address = array.ctypes.data
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= address < high:
                    info["file"] = fields[5] if len(fields) > 5 else ""
        info["readonly"] = getattr(value, "readonly", None)
    return info


def shared(info: dict) -> bool:
    return info["file"].startswith("/dev/shm/streamwise-")


@streamwise.deployment(max_ongoing_requests=8)
class Sink:
    async def describe(self, value) -> dict:
        return describe(value)

    async def echo(self, value):
        return value

    async def make(self, n: int):
        import numpy as np

        return np.full(n, 7, dtype=np.uint8)

    async def blob(self, n: int) -> bytes:
        return b"r" * n

    async def blobs(self, n: int, count: int):
        for i in range(count):
            yield bytes([i]) * n


@streamwise.deployment
class Relay:
    def __init__(self, sink: streamwise.DeploymentHandle):
        self.sink = sink

    async def forward(self, value) -> tuple[dict, dict]:
        """Describe the value here, then pass it on and let the sink describe it."""
        return describe(value), await self.sink.describe.remote(value)


def test_large_arguments_and_results_travel_by_reference(serve):
    """Payloads above the threshold arrive as read-only views of shared memory, both ways."""
    np = pytest.importorskip("numpy")
    handle = serve(Sink.bind())
    info = handle.describe.remote(np.zeros(MB, dtype=np.uint8)).result()
    assert info["type"] == "ndarray" and shared(info)
    result = handle.make.remote(MB).result()
    assert not result.flags.writeable and int(result[-1]) == 7 and shared(describe(result))
    info = handle.describe.remote(b"b" * MB).result()
    assert info["type"] == "memoryview" and info["readonly"] and shared(info)


def test_small_payloads_stay_inline(serve):
    """Payloads below the threshold travel inline and keep their type (bytes stay bytes)."""
    handle = serve(Sink.bind())
    info = handle.describe.remote(b"s" * 1000).result()
    assert info["type"] == "bytes" and not shared(info)
    assert handle.blob.remote(1000).result() == b"r" * 1000


def test_threshold_is_a_handle_option(serve):
    """by_reference_threshold_bytes moves the switch to shared memory, per handle."""
    handle = serve(Sink.bind())
    value = b"s" * 70_000  # below the default threshold, above 64 KiB (see _payload._Sink)
    assert handle.describe.remote(value).result()["type"] == "bytes"
    info = handle.options(by_reference_threshold_bytes=65_536).describe.remote(value).result()
    assert info["type"] == "memoryview" and shared(info)


def test_chain_forwards_without_copy(serve):
    """A received view passed on to the next deployment is named, not copied: same segment."""
    np = pytest.importorskip("numpy")
    handle = serve(Relay.bind(Sink.bind()))
    here, there = handle.forward.remote(np.ones(MB, dtype=np.uint8)).result()
    assert shared(here) and here["file"] == there["file"]


class Marker:
    """Records, in a directory, the pid of every process that unpickles it."""

    def __init__(self, directory: str, payload: bytes) -> None:
        self.directory = directory
        self.payload = payload

    def __reduce__(self):
        return _unpickle_marker, (self.directory, self.payload)


def _unpickle_marker(directory: str, payload: bytes) -> Marker:
    open(os.path.join(directory, str(os.getpid())), "w").close()
    return Marker(directory, payload)


@pytest.mark.parametrize("size", [100, MB])
def test_response_argument_reaches_callee_undecoded(serve, tmp_path, size):
    """A DeploymentResponse passed to another call is decoded only in the callee."""
    handle = serve(Sink.bind())
    marker = Marker(str(tmp_path), b"m" * size)
    upstream = handle.echo.remote(marker)  # the replica decodes it (1) and returns it
    assert handle.describe.remote(upstream).result()["type"] == "Marker"  # decoded there (2)
    assert len(os.listdir(tmp_path)) == 1  # one replica pid, never this process
    assert os.listdir(tmp_path) != [str(os.getpid())]


def test_by_value_response_argument_is_decoded_in_caller(serve, tmp_path):
    """By value, a DeploymentResponse argument is awaited and re-encoded in the caller."""
    handle = serve(Sink.bind()).options(by_reference=False)
    upstream = handle.echo.remote(Marker(str(tmp_path), b"v"))
    assert handle.describe.remote(upstream).result()["type"] == "Marker"
    assert str(os.getpid()) in os.listdir(tmp_path)


def test_to_object_ref_by_reference_only(serve):
    """_to_object_ref gives the result's ObjectRef by reference; by value it is a clear error."""
    import asyncio

    handle = serve(Sink.bind())
    ref = handle.blob.remote(MB)._to_object_ref_sync()
    assert isinstance(ref, streamwise.ObjectRef) and streamwise.get(ref) == b"r" * MB

    async def main():
        return await handle.blob.remote(10)._to_object_ref()

    assert streamwise.get(asyncio.run(main())) == b"r" * 10
    with pytest.raises(UsageError, match="by_reference"):
        handle.options(by_reference=False).blob.remote(10)._to_object_ref()


@pytest.mark.parametrize("codec", ["cloudpickle", "pickle", "msgpack", "orjson"])
@pytest.mark.parametrize("by_reference", [True, False])
def test_codecs_on_both_transports(serve, codec, by_reference):
    """Every codec carries small and store-sized payloads, by reference and by value."""
    handle = serve(Sink.bind()).options(
        by_reference=by_reference, request_serialization=codec, response_serialization=codec
    )
    small = {"a": [1, 2, "x"]}
    large = {"words": ["w" * 100] * 20_000}  # ~2 MB encoded: stored when by reference
    assert handle.echo.remote(small).result() == small
    assert handle.echo.remote(large).result() == large


def test_inline_limit_by_value(serve):
    """By value, payloads over the gRPC message limit fail clearly; by reference they pass."""
    handle = serve(Sink.bind())
    by_value = handle.options(by_reference=False)
    big = b"x" * (5 * 2**20)
    with pytest.raises(MessageTooLargeError) as info:
        by_value.echo.remote(big)
    assert "4194304" in str(info.value) and "by_reference=True" in str(info.value)
    with pytest.raises(RemoteError, match="4194304") as remote:
        by_value.blob.remote(len(big)).result()
    assert remote.value.remote_type == "streamwise.exceptions.MessageTooLargeError"
    with pytest.raises(RemoteError, match="a stream item"):
        list(by_value.blobs.remote(len(big), 1))
    assert list(by_value.blobs.remote(1000, 3)) == [bytes([i]) * 1000 for i in range(3)]
    assert handle.echo.remote(big).result() == big


def test_stream_items_travel_by_reference(serve):
    """Large stream items arrive as read-only shared-memory views; small ones inline."""
    handle = serve(Sink.bind())
    items = list(handle.blobs.remote(MB, 3))
    assert [bytes(i[:1]) for i in items] == [b"\x00", b"\x01", b"\x02"]
    assert all(isinstance(i, memoryview) and shared(describe(i)) for i in items)
    assert list(handle.blobs.remote(10, 2)) == [b"\x00" * 10, b"\x01" * 10]


DEFAULT_SCRIPT = textwrap.dedent(
    """
    import streamwise

    @streamwise.deployment
    class Echo:
        async def kind(self, value):
            return type(value).__name__

    handle = streamwise.run(Echo.bind())
    print(handle.kind.remote(b"x" * 1_000_000).result())
    print(handle.options(by_reference=True).kind.remote(b"x" * 1_000_000).result())
    streamwise.shutdown()
    """
)


def test_grpc_by_default_from_environment():
    """STREAMWISE_USE_GRPC_BY_DEFAULT=1 makes handles send by value; a handle can opt back in."""
    env = dict(os.environ, STREAMWISE_USE_GRPC_BY_DEFAULT="1")
    out = subprocess.run(
        [sys.executable, "-c", DEFAULT_SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["bytes", "memoryview"]
