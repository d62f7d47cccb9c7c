"""Direct ingress: root replicas listen on the public port themselves (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import time

import grpc
import ingress_direct_pb2 as pb
import ingress_direct_pb2_grpc as pb_grpc
import psutil
import pytest

import streamwise
from streamwise.actors.management import running_drivers
from streamwise.proto import management_pb2, management_pb2_grpc


@streamwise.deployment(num_replicas=2, max_ongoing_requests=2)
class Direct:
    def __init__(self, hold_dir: str = ""):
        self.hold_dir = pathlib.Path(hold_dir) if hold_dir else None

    async def Pid(self, req):
        return pb.Reply(pid=os.getpid())

    async def PidStream(self, req):
        for _ in range(3):
            yield pb.Reply(pid=os.getpid())

    async def Hold(self, req):
        # Say it runs, then wait for the test's release file (no timing involved).
        (self.hold_dir / f"started-{req.tag}").write_text(str(os.getpid()))
        while not (self.hold_dir / "release").exists():
            await asyncio.sleep(0.01)
        return pb.Reply(pid=os.getpid())


def _options(direct: bool = True):
    return streamwise.GrpcOptions(
        port=0, host="127.0.0.1", servicer_functions=[pb_grpc.add_DirectServicer_to_server], direct=direct
    )


def _listeners(port: int) -> set[int]:
    """The pids of this test's processes listening on ``port``."""
    me = psutil.Process()
    pids = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            pids.add(proc.pid)
    return pids


def _port() -> int:
    return int(streamwise.ingress_address().rsplit(":", 1)[1])


def _scale(deployment: str, n: int) -> None:
    (driver,) = [d for d in running_drivers() if d.pid == os.getpid()]
    with grpc.insecure_channel(driver.target) as channel:
        stub = management_pb2_grpc.ManagementStub(channel)
        request = management_pb2.ScaleDeploymentRequest(application="default", deployment=deployment, num_replicas=n)
        list(stub.ScaleDeployment(request, metadata=driver.metadata(), timeout=60))


async def _pids(address: str, calls: int) -> list[int]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.DirectStub(channel)
        return [(await stub.Pid(pb.Req(), wait_for_ready=True)).pid for _ in range(calls)]


def test_each_root_replica_listens_and_the_driver_does_not(serve):
    """Once the root replicas run, they (not the driver) listen on the public port, and
    they serve the calls made there."""
    serve(Direct.bind(), grpc_options=_options())
    listening = _listeners(_port())
    assert os.getpid() not in listening
    assert len(listening) == 2
    served = asyncio.run(_pids(streamwise.ingress_address(), 5))
    assert set(served) <= listening


def test_the_proxy_path_is_kept_with_direct_false(serve):
    """GrpcOptions(direct=False): the driver alone listens and forwards every call."""
    serve(Direct.bind(), grpc_options=_options(direct=False))
    assert _listeners(_port()) == {os.getpid()}
    served = asyncio.run(_pids(streamwise.ingress_address(), 10))
    assert os.getpid() not in served


@pytest.mark.parametrize("rpc", ["unary", "stream"])
def test_one_channel_spreads_across_replicas_once_one_is_full(serve, tmp_path, rpc):
    """Four calls at once on ONE channel, against two replicas of max_ongoing_requests=2:
    the replica that took the connection runs two, the router sends the others to
    the other replica."""
    serve(Direct.bind(str(tmp_path)), grpc_options=_options())

    async def main():
        async with grpc.aio.insecure_channel(streamwise.ingress_address()) as channel:
            stub = pb_grpc.DirectStub(channel)
            await stub.Pid(pb.Req(), wait_for_ready=True)  # connected before the burst
            calls = [asyncio.ensure_future(stub.Hold(pb.Req(tag=str(i)))) for i in range(4)]
            while len(list(tmp_path.glob("started-*"))) < 4:
                await asyncio.sleep(0.01)
            (tmp_path / "release").write_text("")
            return [(await call).pid for call in calls]

    async def main_stream():
        # A stream holds its replica until it ends: hold four, then read them all.
        async with grpc.aio.insecure_channel(streamwise.ingress_address()) as channel:
            stub = pb_grpc.DirectStub(channel)
            await stub.Pid(pb.Req(), wait_for_ready=True)
            holds = [asyncio.ensure_future(stub.Hold(pb.Req(tag=f"s{i}"))) for i in range(2)]
            while len(list(tmp_path.glob("started-*"))) < 2:
                await asyncio.sleep(0.01)
            streamed = [[r.pid async for r in stub.PidStream(pb.Req())] for _ in range(2)]
            (tmp_path / "release").write_text("")
            held = [(await call).pid for call in holds]
            return held, streamed

    if rpc == "unary":
        pids = asyncio.run(main())
        assert len(set(pids)) == 2
        assert sorted(pids.count(p) for p in set(pids)) == [2, 2]
    else:
        held, streamed = asyncio.run(main_stream())
        (full,) = set(held)  # both holds ran in-process on the replica of the connection
        assert all(len(set(s)) == 1 and s[0] != full for s in streamed)


def test_a_drained_replica_stops_listening_and_clients_go_on(serve):
    """Scaling 2 -> 1 drains a replica: it leaves the port, and a channel that was
    connected to it goes on with the other one."""
    serve(Direct.bind(), grpc_options=_options())
    address = streamwise.ingress_address()
    before = _listeners(_port())
    assert len(before) == 2

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.DirectStub(channel)
            first = (await stub.Pid(pb.Req(), wait_for_ready=True)).pid
            await asyncio.get_running_loop().run_in_executor(None, _scale, "Direct", 1)
            after = (await stub.Pid(pb.Req(), wait_for_ready=True)).pid
            return first, after

    first, after = asyncio.run(main())
    (survivor,) = _listeners(_port())
    assert survivor in before and after == survivor
    assert first in before


def test_a_killed_replica_leaves_the_port_to_the_others(serve):
    """A replica killed outright leaves the port by itself; new calls reach the others."""
    serve(Direct.bind(), grpc_options=_options())
    address = streamwise.ingress_address()
    victim = min(_listeners(_port()))
    os.kill(victim, signal.SIGKILL)
    psutil.wait_procs([p for p in psutil.Process().children() if p.pid == victim], timeout=10)
    served = asyncio.run(_pids(address, 10))
    assert victim not in served


def test_two_apps_share_the_port(serve):
    """Two apps on one port: `application` picks the app, whichever replica a
    connection reached."""
    serve(Direct.bind(), name="one", grpc_options=_options())
    serve(Direct.options(num_replicas=1).bind(), name="two", grpc_options=_options())
    assert len(_listeners(_port())) == 3

    async def main():
        async with grpc.aio.insecure_channel(streamwise.ingress_address()) as channel:
            stub = pb_grpc.DirectStub(channel)
            one = {(await stub.Pid(pb.Req(), metadata=(("application", "one"),))).pid for _ in range(20)}
            two = {(await stub.Pid(pb.Req(), metadata=(("application", "two"),))).pid for _ in range(20)}
            return one, two

    one, two = asyncio.run(main())
    assert len(two) == 1 and not one & two


FAST_AUTOSCALING = streamwise.AutoscalingConfig(
    min_replicas=0, max_replicas=1, metrics_interval_s=0.05, look_back_period_s=0.2,
    upscale_delay_s=0.1, downscale_delay_s=0.5,
)


def _until(condition, what: str) -> None:
    """Wait (up to 30 s) for ``condition()`` to hold."""
    for _ in range(3000):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_scaled_to_zero_the_driver_listens_and_the_first_call_wakes_the_app(serve):
    """With no root replica running the driver listens on the port, so the first call
    is answered (it starts a replica); once the replica runs, it alone listens; back
    at zero replicas the driver listens again."""
    serve(Direct.options(num_replicas=None, autoscaling_config=FAST_AUTOSCALING).bind(), grpc_options=_options())
    address = streamwise.ingress_address()
    assert _listeners(_port()) == {os.getpid()}
    (first,) = set(asyncio.run(_pids(address, 1)))
    assert first != os.getpid()
    _until(lambda: _listeners(_port()) == {first}, "the replica to take the port over")
    _until(lambda: _listeners(_port()) == {os.getpid()}, "scaling to zero")
    (second,) = set(asyncio.run(_pids(address, 1)))
    assert second not in (first, os.getpid())
