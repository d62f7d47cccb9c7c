"""Replicas placed by Ray across a multi-node Ray cluster started on this machine.

The nodes share the machine but not their identity: each replica's node is the Ray
node that runs it, so calls between nodes take the authenticated TLS path, and a
killed node takes its replicas with it. Skipped when Ray is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

import streamwise
from streamwise import objectstore
from streamwise.actors.management import running_drivers
from streamwise.exceptions import ReplicaDiedError, StreamwiseError
from streamwise.proto import management_pb2, management_pb2_grpc
from streamwise.tracing import viewer

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

_NODE = dict(num_cpus=2, object_store_memory=80 * 2**20)
_FAST_HEALTH = {"health_check_initial_delay_ms": 500, "health_check_period_ms": 500, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes, "node_a" (the head, where this process is) and "node_b"."""
    made = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args=dict(_NODE, resources={"node_a": 100}, include_dashboard=False, _system_config=_FAST_HEALTH),
    )
    node_b = made.add_node(**_NODE, resources={"node_b": 100})
    made.wait_for_nodes()
    ray.init(address=made.address, namespace="streamwise-tests", log_to_driver=False)
    try:
        yield made, made.head_node.node_id, node_b.node_id
    finally:
        ray.shutdown()
        made.shutdown()


def _replica_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "uids"]):
        cmdline = process.info["cmdline"] or []
        if "streamwise.actors.replica" in cmdline and process.info["uids"].real == os.getuid():
            found.append(process)
    return found


@pytest.fixture
def on_ray(cluster):
    """run() on the cluster; afterwards shut down and check no replica process is left."""
    yield cluster
    streamwise.shutdown()
    deadline = time.monotonic() + 20
    while _replica_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _replica_processes(), f"replica processes left: {_replica_processes()}"


def _pinned(node: str, **options):
    return {"ray_actor_options": {"num_cpus": 0, "resources": {node: 1}}, **options}


@streamwise.deployment(**_pinned("node_b"))
class Counter:
    async def count(self, n: int):
        for i in range(n):
            yield i

    async def node(self) -> str:
        return os.environ["STREAMWISE_NODE_ID"]

    async def slow(self, n: int, gap_s: float):
        for i in range(n):
            yield i
            await asyncio.sleep(gap_s)


@streamwise.deployment(**_pinned("node_a"))
class Front:
    def __init__(self, counter):
        self.counter = counter

    async def __call__(self, n: int) -> tuple[str, str, list[int]]:
        items = [i async for i in self.counter.count.remote(n)]
        return os.environ["STREAMWISE_NODE_ID"], await self.counter.node.remote(), items


def test_replicas_run_where_their_resources_are_and_stream_across_nodes(on_ray):
    """Front asks for node_a's resource and Counter for node_b's: each runs on its
    node, and Front's stream from Counter crosses between them whole."""
    _, node_a, node_b = on_ray
    handle = streamwise.run(Front.bind(Counter.bind()), cluster="ray")
    front_node, counter_node, items = handle.remote(50).result()
    assert (front_node, counter_node) == (node_a, node_b)
    assert items == list(range(50))


class Where:
    async def node(self) -> str:
        return os.environ["STREAMWISE_NODE_ID"]


@streamwise.deployment(**_pinned("node_b"))
class Arrays:
    async def session(self) -> str:
        return objectstore.session_name()

    async def total(self, ref: streamwise.ObjectRef) -> tuple[int, bool]:
        array = await ref
        return int(array.sum()), array.flags.writeable

    async def make(self, n: int) -> np.ndarray:
        return np.arange(n, dtype=np.int64)

    async def keep(self, n: int) -> streamwise.ObjectRef:
        return streamwise.put(np.full(n, 7, dtype=np.int64))

    async def chunks(self, n: int, count: int):
        for i in range(count):
            yield np.full(n, i, dtype=np.int64)

    async def several(self, n: int) -> dict:
        return {
            "up": np.arange(n, dtype=np.int64),
            "down": np.arange(n, dtype=np.int64)[::-1].copy(),
            "kept": streamwise.put(np.full(n, 3, dtype=np.int64)),
            "small": b"s" * 100,
        }

    async def last(self, array: np.ndarray) -> int:
        return int(array[-1])

    async def sums(self, array: np.ndarray, count: int):
        for _ in range(count):
            yield int(array.sum())

    async def check(self, value: dict) -> bool:
        n = value["up"].size
        return (
            bool((value["up"] == np.arange(n)).all() and (value["down"] == np.arange(n)[::-1]).all())
            and int(streamwise.get(value["kept"]).sum()) == 3 * n
            and value["small"] == b"s" * 100
        )


def test_object_refs_cross_nodes_and_stay_zero_copy_on_each(on_ray):
    """A 10 MB array put on node_a is read on node_b (another object store session),
    and arrays made on node_b arrive here: as results, inside a returned ref, and
    as stream items. On either side they are read-only views of shared memory."""
    handle = streamwise.run(Arrays.bind(), cluster="ray")
    assert handle.session.remote().result() != objectstore.session_name()  # each node its own store
    n = 10 * 2**20 // 8
    ref = streamwise.put(np.arange(n, dtype=np.int64))
    assert handle.total.remote(ref).result() == (n * (n - 1) // 2, False)
    made = handle.make.remote(n).result()
    assert made.flags.writeable is False and int(made[-1]) == n - 1 and made.nbytes == 10 * 2**20
    kept = handle.keep.remote(n).result()
    assert isinstance(kept, streamwise.ObjectRef) and int(streamwise.get(kept).sum()) == 7 * n
    items = [int(a[0]) for a in handle.chunks.remote(n // 4, 3)]
    assert items == [0, 1, 2]


@streamwise.deployment(**_pinned("node_b"))
class Talker:
    def __init__(self) -> None:
        print("talker ready on node_b", flush=True)

    def say(self, words: str) -> int:
        logging.getLogger("talker").warning("said %s", words)
        return os.getpid()


def _logs_of(app: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "streamwise.cli", "logs", app], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_output_of_a_replica_on_another_node_reaches_streamwise_logs(on_ray, capfd):
    """What a replica on node_b prints (stdout) and logs (stderr) comes to the driver:
    into the replica's log file, which `streamwise logs` reads, and to the driver's
    own stdout and stderr behind the replica's id and pid."""
    handle = streamwise.run(Talker.bind(), name="talk", cluster="ray")
    pid = handle.say.remote("hello").result()
    deadline = time.monotonic() + 30
    while "said hello" not in (logs := _logs_of("talk")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "talker ready on node_b" in logs and "said hello" in logs
    assert all(line.startswith("(Talker#") for line in logs.splitlines() if "talker ready" in line or "said" in line)
    out, err = capfd.readouterr()
    assert f"pid={pid}) talker ready on node_b" in out
    assert f"pid={pid}) said hello" in err


def _files(session: str, kinds: str = "otn") -> list[str]:
    """The store files of ``session`` of the given kinds (o: segment, t: being written, n: pin)."""
    return sorted(name for name in os.listdir(f"/dev/shm/{session}") if name[0] in kinds and name[1] == "-")


def test_values_of_many_chunks_and_segments_cross_nodes_whole(on_ray):
    """A result from node_b made of several segments, each many chunks long (two
    arrays, a ref stored there, small bytes inline) arrives intact, as a result and
    as stream items; sent back as the argument of a call or a stream, node_b reads
    it intact too."""
    handle = streamwise.run(Arrays.bind(), cluster="ray")
    n = 3 * 2**20 // 8 + 5  # 3 MB and a bit: several chunks, the last one partial
    value = handle.several.remote(n).result()
    assert (value["up"] == np.arange(n)).all() and (value["down"] == np.arange(n)[::-1]).all()
    assert int(streamwise.get(value["kept"]).sum()) == 3 * n and value["small"] == b"s" * 100
    assert handle.check.remote(value).result()
    assert list(handle.sums.remote(value["down"], 2)) == [n * (n - 1) // 2] * 2
    items = list(handle.chunks.remote(n, 4))
    assert [int(a[0]) for a in items] == [0, 1, 2, 3] and all(a.size == n for a in items)


def test_traced_streams_of_chunked_items_cross_nodes(on_ray, tmp_path):
    """With tracing on, a stream from node_b whose items each carry chunks arrives
    whole, and the replica's span counts its items, not the chunk messages."""
    handle = streamwise.run(
        Arrays.bind(), cluster="ray", tracing=streamwise.TracingConfig(exporter="jsonl", jsonl_dir=str(tmp_path))
    )
    n = 3 * 2**20 // 8 + 5
    items = list(handle.chunks.remote(n, 3))
    assert [int(a[0]) for a in items] == [0, 1, 2] and all(a.size == n for a in items)
    streamwise.shutdown()  # flushes every process's spans
    (span,) = [s for s in viewer.load(tmp_path) if s.name == "Arrays.chunks"]
    assert span.record["attributes"]["streamwise.items"] == 3


def _cancel_mid_transfer(call, receiving: str) -> None:
    """Start ``call()`` until one is cancelled while ``receiving`` (a session) has a
    segment being written; fail if none is ever seen in progress."""
    for _ in range(5):
        response = call()
        while not response.done() and not _files(receiving, "t"):
            time.sleep(0.0005)
        if not response.done():
            response.cancel()
            return
    pytest.fail("never saw the transfer in progress")


def _settles(sessions: list[str], want: list[list[str]]) -> bool:
    deadline = time.monotonic() + 20
    while [_files(s) for s in sessions] != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return [_files(s) for s in sessions] == want


def test_transfers_cancelled_midway_leave_no_segment(on_ray):
    """A 64 MB result from node_b cancelled while its chunks are written here, and
    a 64 MB argument cancelled while its chunks are written on node_b: the partly
    written segment is removed, and no segment or pin of either stays on either
    node (node_b never stored the result: its chunks came from the array itself)."""
    handle = streamwise.run(Arrays.bind(), cluster="ray")
    sessions = [objectstore.session_name(), handle.session.remote().result()]
    n = 64 * 2**20 // 8
    before = [_files(s) for s in sessions]
    _cancel_mid_transfer(lambda: handle.make.remote(n), sessions[0])
    assert _settles(sessions, before)
    array = np.arange(n, dtype=np.int64)
    _cancel_mid_transfer(lambda: handle.last.remote(array), sessions[1])
    assert _settles(sessions, before)
    assert int(handle.make.remote(n).result()[-1]) == n - 1  # and the next ones arrive whole
    assert handle.last.remote(array).result() == n - 1


def test_callers_prefer_replicas_on_their_own_node(on_ray):
    """max_replicas_per_node=1 spreads two replicas over the two nodes; calls from
    this process (on node_a) all go to node_a's, unless it says prefer_local_node=False."""
    _, node_a, node_b = on_ray
    where = streamwise.deployment(
        Where, name="Where", num_replicas=2, max_replicas_per_node=1, ray_actor_options={"num_cpus": 0}
    )
    handle = streamwise.run(where.bind(), cluster="ray")
    assert {handle.node.remote().result() for _ in range(30)} == {node_a}
    anywhere = handle.options(prefer_local_node=False)
    assert {anywhere.node.remote().result() for _ in range(60)} == {node_a, node_b}


@streamwise.deployment(**_pinned("node_b"))
class LoopOnB:
    async def loop(self) -> str:
        return type(asyncio.get_running_loop()).__module__


def test_replicas_on_other_nodes_take_the_drivers_settings(on_ray, monkeypatch):
    """STREAMWISE_* variables set in the driver reach its replicas on every node, as
    they reach those on its own machine (here: the event loop, on node_b)."""
    monkeypatch.setenv("STREAMWISE_EVENT_LOOP", "asyncio")
    handle = streamwise.run(LoopOnB.bind(), cluster="ray")
    assert handle.loop.remote().result().startswith("asyncio")


def test_a_replica_asking_for_what_no_node_has_fails_the_start(on_ray, monkeypatch):
    """Ray cannot place a replica needing a resource no node has: run() fails naming it."""
    monkeypatch.setattr("streamwise.actors.ray_launcher.PLACEMENT_TIMEOUT_S", 2.0)
    nowhere = streamwise.deployment(Where, name="Nowhere", ray_actor_options={"num_cpus": 0, "resources": {"gpu_xl": 1}})
    with pytest.raises(StreamwiseError, match="gpu_xl"):
        streamwise.run(nowhere.bind(), cluster="ray")


def _manage(call: str, request: object) -> object:
    """One call of this driver's management API (a streamed answer's last message)."""
    import grpc

    (driver,) = [d for d in running_drivers() if d.pid == os.getpid()]
    with grpc.insecure_channel(driver.target) as channel:
        answer = getattr(management_pb2_grpc.ManagementStub(channel), call)(request, metadata=driver.metadata())
        return answer if not hasattr(answer, "__iter__") else list(answer)[-1]


def _status(deployment: str) -> management_pb2.DeploymentStatus:
    app = _manage("DescribeApplication", management_pb2.DescribeApplicationRequest(application="default"))
    (found,) = [d for d in app.deployments if d.name == deployment]
    return found


def test_a_killed_node_fails_its_calls_and_its_replica_is_replaced(on_ray):
    """A replica on node_c streams to this process when node_c's raylet is killed: the
    stream fails with ReplicaDiedError, and the replica comes back on node_d."""
    cluster, _, _ = on_ray
    node_c = cluster.add_node(**_NODE, resources={"pool": 1})
    cluster.wait_for_nodes()
    pooled = Counter.options(name="Pooled", ray_actor_options={"num_cpus": 0, "resources": {"pool": 1}})
    handle = streamwise.run(pooled.bind(), cluster="ray")
    assert handle.node.remote().result() == node_c.node_id
    node_d = cluster.add_node(**_NODE, resources={"pool": 1})
    cluster.wait_for_nodes()
    outcome: list[object] = []
    first = threading.Event()

    def consume() -> None:
        try:
            for i in handle.slow.remote(10_000, 0.01):
                if i == 0:
                    first.set()
            outcome.append("ended")
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=consume)
    reader.start()
    assert first.wait(30)
    cluster.remove_node(node_c, allow_graceful=False)
    reader.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], ReplicaDiedError), outcome
    deadline = time.monotonic() + 60
    while _status("Pooled").running_replicas != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert handle.node.remote().result() == node_d.node_id
    cluster.remove_node(node_d)


@streamwise.deployment(**_pinned("node_b"))
class Leaf:
    async def pid(self) -> int:
        return os.getpid()


@streamwise.deployment(**_pinned("node_b"), user_config={"tag": "first"})
class Relay:
    def __init__(self, leaf):
        self.leaf = leaf
        self.tag = None

    def reconfigure(self, config: dict) -> None:
        self.tag = config["tag"]

    async def __call__(self, inputs: dict[str, bytes] | None = None) -> tuple[int, str, int] | bytes:
        if inputs is not None:  # an external client's Predict
            return f"{os.getpid()} {self.tag}".encode()
        return os.getpid(), self.tag, await self.leaf.pid.remote()


def _sever_links_to_driver(pid: int) -> int:
    """Abort every TCP connection the process ``pid`` opened to this driver (the
    controller, and whatever else the driver listens on), as a network outage between
    its node and the driver's would; how many there were."""
    listening = {c.laddr.port for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    cut = 0
    for c in psutil.Process(pid).net_connections("tcp"):
        if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in listening:
            subprocess.run(
                ["ss", "-K", "sport", "=", f":{c.laddr.port}", "dport", "=", f":{c.raddr.port}"],
                check=True, capture_output=True,
            )
            cut += 1
    return cut


def _can_sever() -> bool:
    """Whether this machine lets ``ss -K`` abort a TCP connection (root, a kernel with
    socket destruction)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted:
                try:
                    subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"], check=True,
                                   capture_output=True, timeout=10)
                except (OSError, subprocess.SubprocessError):
                    return False
                client.settimeout(5)
                try:
                    client.send(b"x")
                    return client.recv(1) == b""
                except OSError:
                    return True


def _until(check, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_a_replica_rides_out_losing_its_controller(on_ray):
    """Relay (node_b, serving the public gRPC port itself) calls Leaf (node_b) when
    every connection it has to the driver is aborted. It goes on serving, handle calls
    and external clients, with the replica set it knew, reconnects, and then gets
    what the driver changed meanwhile: a new user_config, a second Leaf."""
    import grpc

    from streamwise.proto import predict_pb2, predict_pb2_grpc

    if not _can_sever():
        pytest.skip("ss -K cannot abort TCP connections here (needs root and socket destruction)")
    handle = streamwise.run(
        Relay.bind(Leaf.bind()), cluster="ray", grpc_options=streamwise.GrpcOptions(port=0, host="127.0.0.1")
    )

    def predict() -> str:
        with grpc.insecure_channel(streamwise.ingress_address()) as channel:
            reply = predict_pb2_grpc.PredictAPIsServiceStub(channel).Predict(predict_pb2.PredictRequest(), timeout=10)
        return reply.prediction.decode()

    relay_pid, tag, leaf_pid = handle.remote().result()
    assert tag == "first"
    assert predict() == f"{relay_pid} first"
    assert _sever_links_to_driver(relay_pid) >= 1
    assert handle.remote().result() == (relay_pid, "first", leaf_pid)  # served on, routed as before
    assert predict() == f"{relay_pid} first"

    _manage("UpdateUserConfig", management_pb2.UpdateUserConfigRequest(
        application="default", deployment="Relay", user_config_json='{"tag": "second"}'))
    assert _until(lambda: handle.remote().result()[1] == "second"), "the new user_config never arrived"
    _manage("ScaleDeployment", management_pb2.ScaleDeploymentRequest(
        application="default", deployment="Leaf", num_replicas=2))
    leaves: set[int] = set()

    def both_leaves_called() -> bool:
        leaves.add(handle.remote().result()[2])
        return len(leaves) == 2

    assert _until(both_leaves_called), f"Relay never routed to the second Leaf: {leaves}"
    assert handle.remote().result()[0] == relay_pid
    assert predict() == f"{relay_pid} second"  # its listener on the public port stayed open
    assert _status("Relay").running_replicas == 1


_DRIVER = """
import json, os, sys
import streamwise
from streamwise import objectstore


def pinned(node, cpus=0):
    return {"ray_actor_options": {"num_cpus": cpus, "resources": {node: 1}}}


@streamwise.deployment(**pinned("node_b", float(os.environ.get("FAR_CPUS", "0"))))
class Far:
    def __init__(self):
        self.kept = streamwise.put(b"f" * 1_000_000)  # a segment in node_b's store

    async def where(self):
        return os.getpid(), objectstore.session_name()


@streamwise.deployment(**pinned("node_a"))
class Near:
    def __init__(self, far):
        self.far = far
        self.kept = streamwise.put(b"n" * 1_000_000)  # a segment in the driver's store

    async def where(self):
        return [(os.getpid(), objectstore.session_name()), await self.far.where.remote()]

    async def __call__(self, inputs):  # an external client's Predict
        far, _ = await self.far.where.remote()
        return f"{os.getpid()} {far}".encode()


cluster = streamwise.RayCluster(
    address=os.environ["RAY_ADDRESS"], namespace="drivers", controller_grace_s=float(os.environ["GRACE_S"])
)
handle = streamwise.run(
    Near.bind(Far.bind()), cluster=cluster,
    grpc_options=streamwise.GrpcOptions(host="127.0.0.1", port=int(os.environ["PORT"])),
)
print(json.dumps(handle.where.remote().result()), flush=True)
sys.stdin.read()  # until told to stop, or killed
streamwise.shutdown()
"""


class _Driver:
    """A driver process running ``_DRIVER`` on the cluster; another ``version`` of
    the script is other code (a comment differs)."""

    def __init__(self, cluster, tmp_path, port: int, grace_s: float, far_cpus: float = 0, version: int = 1) -> None:
        script = tmp_path / "driver.py"
        script.write_text(f"{_DRIVER}# version {version}\n")
        self.process = subprocess.Popen(
            [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(
                os.environ, RAY_ADDRESS=cluster.address, PORT=str(port), GRACE_S=str(grace_s), FAR_CPUS=str(far_cpus)
            ),
        )
        import json

        (self.near, self.near_session), (self.far, self.far_session) = json.loads(self.process.stdout.readline())

    def kill(self) -> None:
        self.process.kill()
        self.close()

    def stop(self) -> None:
        self.process.stdin.close()
        assert self.process.wait(60) == 0
        self.close()

    def close(self) -> None:
        self.process.wait()
        self.process.stdout.close()
        with contextlib.suppress(OSError):
            self.process.stdin.close()


def _predict(port: int) -> str:
    import grpc

    from streamwise.proto import predict_pb2, predict_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = predict_pb2_grpc.PredictAPIsServiceStub(channel)
        return stub.Predict(predict_pb2.PredictRequest(), timeout=15).prediction.decode()


class _Caller:
    """Calls the app's port all along from a thread, every other call on one kept
    channel and the others each on a new connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: list[str] = []
        self.failures: list[BaseException] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._call_all_along)

    def __enter__(self) -> _Caller:
        self._thread.start()
        assert _until(lambda: self.answers, 15), self.failures[:3]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(30)

    def _call_all_along(self) -> None:
        import grpc

        from streamwise.proto import predict_pb2, predict_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as kept:
            for n in itertools.count():
                if self._done.is_set():
                    return
                try:
                    if n % 2:
                        self.answers.append(_predict(self.port))
                    else:
                        stub = predict_pb2_grpc.PredictAPIsServiceStub(kept)
                        self.answers.append(stub.Predict(predict_pb2.PredictRequest(), timeout=15).prediction.decode())
                except grpc.RpcError as exc:
                    self.failures.append(exc)
                time.sleep(0.02)


def _hosts(namespace: str = "drivers") -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace]


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_replicas_serve_on_after_their_driver_dies_then_stop(on_ray, tmp_path):
    """The controller lives in the driver. When a driver is SIGKILLed, its replicas
    on both nodes go on serving external clients (Near on node_a calling Far on
    node_b) for RayCluster.controller_grace_s; then they drain and exit, freeing
    their stores, and their actors end: nothing of the app is left."""
    cluster, _, _ = on_ray
    port = _free_port()
    driver = _Driver(cluster, tmp_path, port, grace_s=3.0)
    assert _files(driver.near_session, "o") and _files(driver.far_session, "o")
    assert _predict(port) == f"{driver.near} {driver.far}"
    driver.kill()
    assert _predict(port) == f"{driver.near} {driver.far}"  # served on, across nodes, with no driver
    for pid in (driver.near, driver.far):
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=30)
    assert not os.path.exists(f"/dev/shm/{driver.near_session}") and not os.path.exists(
        f"/dev/shm/{driver.far_session}"
    )
    assert _until(lambda: not _hosts()), _hosts()


def test_the_next_driver_of_an_app_takes_over_from_a_dead_ones_replicas_without_a_gap(on_ray, tmp_path):
    """A driver is SIGKILLed; its replicas serve on. The app's next driver (same name,
    namespace and port, other code) starts its own replicas, and only once they serve has the
    dead driver's drain and end. A client calling all along, every other call on one
    channel and the others each on a new connection (which may reach the new
    driver's listener while it starts), sees no call fail, answered first by the old
    replicas, then by the new ones; once the new driver stops, nothing is left."""
    cluster, _, _ = on_ray
    port = _free_port()
    first = _Driver(cluster, tmp_path, port, grace_s=60.0)
    first.kill()
    with _Caller(port) as caller:
        second = _Driver(cluster, tmp_path, port, grace_s=60.0, version=2)  # other code: replaced
        try:
            assert not psutil.pid_exists(first.near) and not psutil.pid_exists(first.far)
            new = f"{second.near} {second.far}"
            assert _until(lambda: caller.answers[-1] == new, 15), caller.answers[-1]
        finally:
            caller.stop()
            second.stop()
    assert not caller.failures, caller.failures[:3]
    assert caller.answers[0] == f"{first.near} {first.far}"
    assert _until(lambda: not _hosts()), _hosts()


def test_the_next_driver_of_an_app_takes_a_dead_ones_replicas_back(on_ray, tmp_path):
    """A driver is SIGKILLed; the app's next driver runs the same code, so it takes
    the replicas back as they run (same processes and stores, nothing restarted)
    while a client calls all along without a failure. It supervises them: a
    replica killed afterwards is replaced. Once it stops, nothing of either is left."""
    cluster, _, _ = on_ray
    port = _free_port()
    first = _Driver(cluster, tmp_path, port, grace_s=60.0)
    first.kill()
    with _Caller(port) as caller:
        second = _Driver(cluster, tmp_path, port, grace_s=60.0)
        try:
            assert (second.near, second.far) == (first.near, first.far)
            assert (second.near_session, second.far_session) == (first.near_session, first.far_session)
            caller.stop()
            assert caller.answers and set(caller.answers) == {f"{first.near} {first.far}"}, set(caller.answers)
            assert not caller.failures, caller.failures[:3]
            os.kill(first.far, signal.SIGKILL)
            assert _until(lambda: _predict(port) != f"{first.near} {first.far}"), "Far was not replaced"
        finally:
            caller.stop()
            second.stop()
    assert _until(lambda: not _hosts()), _hosts()
    assert not os.path.exists(f"/dev/shm/{first.near_session}") and not os.path.exists(f"/dev/shm/{first.far_session}")


def test_a_dead_drivers_replicas_make_room_when_the_next_ones_cannot_be_placed_beside_them(on_ray, tmp_path):
    """Far asks for both CPUs of node_b: the next driver's Far cannot be placed while
    the dead driver's holds them, so that one is asked to drain first, and the app
    starts (after a short wait) instead of failing for want of a node."""
    cluster, _, _ = on_ray
    port = _free_port()
    first = _Driver(cluster, tmp_path, port, grace_s=60.0, far_cpus=2)
    first.kill()
    second = _Driver(cluster, tmp_path, port, grace_s=60.0, far_cpus=2, version=2)
    try:
        assert not psutil.pid_exists(first.far)
        assert _predict(port) == f"{second.near} {second.far}"
    finally:
        second.stop()
    assert _until(lambda: not _hosts()), _hosts()


def test_stopped_replicas_give_their_resources_back_to_ray(on_ray):
    """A replica's actor holds what it asked Ray for until the replica has stopped,
    not longer: scaled down or shut down, its CPU is Ray's to place again."""
    before = ray.available_resources().get("CPU", 0)
    busy = streamwise.deployment(
        Where, name="Busy", num_replicas=2, ray_actor_options={"num_cpus": 1, "resources": {"node_b": 1}}
    )
    handle = streamwise.run(busy.bind(), cluster="ray")
    handle.node.remote().result()
    assert _until(lambda: ray.available_resources().get("CPU", 0) == before - 2, 10)
    _manage("ScaleDeployment", management_pb2.ScaleDeploymentRequest(
        application="default", deployment="Busy", num_replicas=1))
    assert _until(lambda: ray.available_resources().get("CPU", 0) == before - 1), ray.available_resources()
    streamwise.shutdown()
    assert _until(lambda: ray.available_resources().get("CPU", 0) == before), ray.available_resources()


_CLI_APP = """
import os
import streamwise


@streamwise.deployment(ray_actor_options={"num_cpus": 0, "resources": {"node_b": 1}})
class Far:
    async def pid(self):
        return os.getpid()


@streamwise.deployment(ray_actor_options={"num_cpus": 0, "resources": {"node_a": 1}})
class Near:
    def __init__(self, far):
        self.far = far

    async def __call__(self, inputs):
        return f"{os.getpid()} {await self.far.pid.remote()}".encode()


app = Near.bind(Far.bind())
"""


def test_streamwise_run_restart_starts_a_killed_driver_again_with_the_same_replicas(on_ray, tmp_path):
    """`streamwise run --restart` runs the driver as its child. SIGKILLed, the
    driver is started again and takes its replicas back: a client calling all along
    sees no failure, answered by the same replicas. SIGTERM to the command drains
    and stops everything."""
    cluster, _, _ = on_ray
    (tmp_path / "near_far.py").write_text(_CLI_APP)
    port = _free_port()
    command = subprocess.Popen(
        [sys.executable, "-m", "streamwise.cli", "run", "near_far:app", "--cluster", "ray", "--restart",
         "--grpc-host", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", "-1"],
        cwd=tmp_path, stdout=subprocess.PIPE, text=True, env=dict(os.environ, RAY_ADDRESS=cluster.address),
    )
    try:
        assert "is running" in command.stdout.readline()
        replicas = _predict(port)
        (driver,) = psutil.Process(command.pid).children()
        with _Caller(port) as caller:
            driver.kill()
            assert "is running" in command.stdout.readline()  # the driver started again
            (again,) = psutil.Process(command.pid).children()
            assert again.pid != driver.pid
            caller.stop()
        assert not caller.failures, caller.failures[:3]
        assert set(caller.answers) == {replicas} and _predict(port) == replicas
        command.send_signal(signal.SIGTERM)
        assert command.wait(60) == 0
    finally:
        command.kill()
        command.wait()
        command.stdout.close()
    assert _until(lambda: not _hosts("streamwise")), _hosts("streamwise")
