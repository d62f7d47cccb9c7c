"""ObjectRef, put and get: values in shared memory, read back without a copy."""

from __future__ import annotations

import glob
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

import streamwise
from streamwise.exceptions import ObjectStoreFullError, SerializationError, UsageError

MB = 1_000_000  # above the default by-reference threshold (100 KiB)


def backing_file(address: int) -> str:
    """The file mapped at ``address`` in this process ("" for anonymous memory)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 else ""
    raise LookupError(hex(address))


def address_of(buffer) -> int:
    import numpy as np

    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


def segments() -> list[str]:
    """Stored segments of this process's store session (what values occupy)."""
    return sorted(glob.glob(f"/dev/shm/streamwise-{os.getpid()}-*/o-*"))


def in_shared_memory(buffer) -> bool:
    return backing_file(address_of(buffer)).startswith(f"/dev/shm/streamwise-{os.getpid()}-")


def test_put_get_round_trip(serve):
    """Any picklable value comes back equal from get() and from `await ref`."""
    import asyncio

    values = [None, 3, "text", [1, (2, 3)], {"k": {"nested": b"small"}}, b"x" * MB]
    refs = [streamwise.put(v) for v in values]
    assert streamwise.get(refs) == values
    assert asyncio.run(_await_all(refs)) == values
    assert all(isinstance(r, streamwise.ObjectRef) and r.nbytes > 0 for r in refs)


async def _await_all(refs):
    return [await r for r in refs]


def test_numpy_comes_back_as_readonly_view_of_shared_memory(serve):
    """A large numpy array is read back without a copy: backed by the segment, writes rejected."""
    np = pytest.importorskip("numpy")
    original = np.arange(MB // 8, dtype=np.int64)
    value = streamwise.get(streamwise.put(original))
    assert np.array_equal(value, original)
    assert in_shared_memory(value)
    assert not value.flags.writeable
    with pytest.raises(ValueError):
        value[0] = 1
    with pytest.raises(ValueError):
        value.flags.writeable = True


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_byte_strings_come_back_as_readonly_views(serve, kind):
    """Large bytes, bytearray and memoryview come back as read-only memoryviews of the segment."""
    original = kind(os.urandom(MB))
    value = streamwise.get(streamwise.put(original))
    assert isinstance(value, memoryview) and value.readonly
    assert value == bytes(original)
    assert in_shared_memory(value)
    with pytest.raises(TypeError):
        value[0] = 1


def test_small_buffers_keep_their_type(serve):
    """Buffers below the threshold are copied into the stored stream and keep their type."""
    np = pytest.importorskip("numpy")
    assert streamwise.get(streamwise.put(b"tiny")) == b"tiny"
    small = streamwise.get(streamwise.put(np.arange(10)))
    assert small.flags.writeable and list(small) == list(range(10))


def test_value_lives_while_a_ref_or_view_does(serve):
    """Segments are freed when the last ref and the last view of them are gone."""
    np = pytest.importorskip("numpy")
    ref = streamwise.put(np.ones(MB, dtype=np.uint8))
    assert segments()
    view = streamwise.get(ref)
    del ref
    assert segments() and int(view[-1]) == 1  # the view alone keeps it
    del view
    assert segments() == []


def test_object_ref_is_not_pickled_outside_streamwise(serve):
    """Pickling a ref by other means is refused: its lifetime could not be tracked."""
    ref = streamwise.put(1)
    with pytest.raises(UsageError, match="by-reference"):
        pickle.dumps(ref)


def test_get_rejects_what_is_not_a_ref(serve):
    """get() names the wrong type it was given."""
    with pytest.raises(UsageError, match="int"):
        streamwise.get(3)


@streamwise.deployment
class Keeper:
    def __init__(self):
        self.kept = None

    async def total(self, ref) -> int:
        """Resolve a ref in this process."""
        return int((await ref).sum())

    async def keep(self, ref) -> None:
        self.kept = ref

    async def drop(self) -> None:
        self.kept = None

    async def make(self, n: int):
        return streamwise.put(bytes(n))


def test_refs_resolve_in_any_process(serve):
    """A ref passed to a replica resolves there; a ref made in a replica resolves here."""
    np = pytest.importorskip("numpy")
    handle = serve(Keeper.bind())
    ref = streamwise.put(np.ones(MB, dtype=np.uint8))
    assert handle.total.remote(ref).result() == MB
    made = handle.make.remote(MB).result()
    assert isinstance(made, streamwise.ObjectRef)
    assert streamwise.get(made) == bytes(MB)


def test_a_ref_held_elsewhere_keeps_the_value(serve):
    """Dropping our ref does not free a value a replica still holds; its drop does."""
    handle = serve(Keeper.bind())
    ref = streamwise.put(b"k" * MB)
    handle.keep.remote(ref).result()
    del ref
    assert segments()
    handle.drop.remote().result()
    assert segments() == []


def test_by_value_handle_refuses_refs(serve):
    """A ref cannot travel through a by_reference=False handle: clear error at the call site."""
    handle = serve(Keeper.bind()).options(by_reference=False)
    with pytest.raises(SerializationError, match="by_reference"):
        handle.keep.remote(streamwise.put(1))


CAPACITY_SCRIPT = textwrap.dedent(
    """
    import streamwise
    from streamwise.exceptions import ObjectStoreFullError

    kept = streamwise.put(b"a" * 600_000)
    try:
        streamwise.put(b"b" * 600_000)
    except ObjectStoreFullError as exc:
        print("full:", exc)
    del kept
    streamwise.put(b"c" * 600_000)  # fits again once the first is freed
    print("fits")
    streamwise.shutdown()
    """
)


def test_capacity_limits_puts():
    """Past STREAMWISE_OBJECT_STORE_MEMORY a put raises ObjectStoreFullError; freeing makes room."""
    env = dict(os.environ, STREAMWISE_OBJECT_STORE_MEMORY="1000000")
    out = subprocess.run(
        [sys.executable, "-c", CAPACITY_SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "full:" in out.stdout and "1000000" in out.stdout and "STREAMWISE_OBJECT_STORE_MEMORY" in out.stdout
    assert out.stdout.rstrip().endswith("fits")
    assert ObjectStoreFullError.__mro__[1] is streamwise.exceptions.StreamwiseError
