"""Model multiplexing with real replicas: routing to the replica holding a model,
then to one with a free slot; LRU eviction with unload(); the model id's ways in."""

from __future__ import annotations

import asyncio
import os

import pytest

import streamwise
from streamwise.exceptions import RemoteError, UsageError


class _Model:
    def __init__(self, name: str, unloaded: list[str]) -> None:
        self.name = name
        self._unloaded = unloaded

    async def unload(self) -> None:
        self._unloaded.append(self.name)


@streamwise.deployment(num_replicas=2, max_ongoing_requests=8)
class Models:
    def __init__(self) -> None:
        self.loads: list[str] = []
        self.unloaded: list[str] = []

    @streamwise.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> _Model:
        self.loads.append(model_id)
        await asyncio.sleep(0.01)
        return _Model(model_id, self.unloaded)

    async def __call__(self, x: int) -> tuple[int, str, int]:
        model = await self.get_model(streamwise.get_multiplexed_model_id())
        return os.getpid(), model.name, x

    async def without_id(self) -> str:
        return (await self.get_model()).name

    async def history(self) -> tuple[int, list[str], list[str]]:
        return os.getpid(), self.loads, self.unloaded


def _calls(handle, model_id: str, n: int = 10) -> set[int]:
    """The pids that served ``n`` sequential calls for ``model_id``."""
    model = handle.options(multiplexed_model_id=model_id)
    pids = set()
    for i in range(n):
        pid, name, x = model.remote(i).result()
        assert (name, x) == (model_id, i)
        pids.add(pid)
    return pids


def test_calls_go_where_their_model_is_then_where_a_slot_is_free(serve):
    """Calls for one model all reach the replica that loaded it; with each replica's
    slots (2) known, a third and fourth model go to the replica with room."""
    handle = serve(Models.bind())
    (home_a,) = _calls(handle, "a")
    (home_b,) = _calls(handle, "b")
    assert _calls(handle, "a") == {home_a}
    # Each model was loaded once, wherever it went.
    histories = {}
    for _ in range(60):
        pid, loads, _unloaded = handle.history.remote().result()
        histories[pid] = loads
    assert sorted(m for loads in histories.values() for m in loads) == ["a", "b"]
    if home_a == home_b:  # that replica is full: the next model goes to the other
        (home_c,) = _calls(handle, "c")
        assert home_c != home_a
    else:  # one slot left on each: c and d fill them, one each
        homes = [_calls(handle, m) for m in ("c", "d")]
        assert {pid for pids in homes for pid in pids} == {home_a, home_b}


def test_lru_eviction_calls_unload(serve):
    """With two slots, a third model evicts the least recently used one (not the
    oldest loaded), whose unload() runs; an evicted model loads again on its next call."""
    handle = serve(Models.options(num_replicas=1).bind())
    for model_id in ("a", "b", "a", "c"):
        _calls(handle, model_id, 2)
    _, loads, unloaded = handle.history.remote().result()
    assert (loads, unloaded) == (["a", "b", "c"], ["b"])
    _calls(handle, "b", 2)
    _, loads, unloaded = handle.history.remote().result()
    assert (loads, unloaded) == (["a", "b", "c", "b"], ["b", "a"])


def test_concurrent_calls_share_one_load_and_the_id_is_required(serve):
    """Twenty concurrent first calls of a model load it once. Without a model id the
    loader's caller gets a UsageError naming how to give one."""
    handle = serve(Models.options(num_replicas=1).bind())

    async def burst() -> list[tuple[int, str, int]]:
        model = handle.options(multiplexed_model_id="z")
        return await asyncio.gather(*(model.remote(i) for i in range(20)))

    results = asyncio.run(burst())
    assert [r[1:] for r in results] == [("z", i) for i in range(20)]
    _, loads, _ = handle.history.remote().result()
    assert loads == ["z"]
    assert handle.options(multiplexed_model_id="z").without_id.remote().result() == "z"
    with pytest.raises(RemoteError) as raised:
        handle.without_id.remote().result()
    assert raised.value.remote_type == "streamwise.exceptions.UsageError" and "multiplexed_model_id" in raised.value.remote_message


def test_bad_multiplexed_declarations_are_refused():
    with pytest.raises(UsageError, match="max_num_models_per_replica must be an int >= 1"):
        streamwise.multiplexed(max_num_models_per_replica=0)
    with pytest.raises(UsageError, match="needs an async def"):
        streamwise.multiplexed(lambda self, model_id: None)
    with pytest.raises(UsageError, match=r"must take \(self, model_id\)"):

        @streamwise.multiplexed
        async def load(self): ...


@streamwise.deployment(num_replicas=2)
class Served:
    @streamwise.multiplexed(max_num_models_per_replica=1)
    async def get_model(self, model_id: str) -> str:
        return model_id

    async def __call__(self, inputs: dict) -> bytes:
        return f"{os.getpid()} {await self.get_model()}".encode()


def test_ingress_metadata_picks_the_model_and_its_replica(serve):
    """The multiplexed_model_id metadata of an external gRPC call reaches the loader,
    and every call for one model lands on the replica holding it."""
    import grpc

    from streamwise.proto import predict_pb2, predict_pb2_grpc

    serve(Served.bind(), grpc_options=streamwise.GrpcOptions(port=0, host="127.0.0.1"))

    async def ask(model_id: str) -> set[str]:
        async with grpc.aio.insecure_channel(streamwise.ingress_address()) as channel:
            stub = predict_pb2_grpc.PredictAPIsServiceStub(channel)
            replies = [
                await stub.Predict(predict_pb2.PredictRequest(), metadata=(("multiplexed_model_id", model_id),))
                for _ in range(8)
            ]
        return {reply.prediction.decode() for reply in replies}

    (first,) = asyncio.run(ask("m1"))
    pid, name = first.split()
    assert name == "m1"
    (second,) = asyncio.run(ask("m2"))  # m1's replica is full (one slot): m2 goes to the other
    assert second.split()[1] == "m2" and second.split()[0] != pid
