"""A driver's death on a Ray cluster, and its next driver: taking the replicas back vs replacing them.

Starts a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``). A
driver process runs an app served on a gRPC port: Front on node A calls Model on
node B, whose constructor takes ``--load-s`` (a model's weights loading). A client
calls the port all along, every call on a new connection. The driver is SIGKILLed
(its replicas serve on), and the app's next driver is started:

- with the same code: it takes the replicas back as they run;
- with other code (a comment differs): it starts new ones, and the old ones drain
  once those serve (what every restart did before);
- by ``streamwise run --restart``, which starts its driver again as soon as it is
  killed: the time from the kill until the app runs again.

Printed for the first two: the new driver's ``run()`` (until the app is supervised
again) and its process's start to ready; for ``--restart``, the kill to the app
running again; for each, the client's calls and failures, and whether the replicas
were restarted. With ``ray[serve]`` installed, the same for Ray Serve,
whose controller is a detached actor: it is killed and Ray restarts it; printed,
the time until it answers ``serve.status()`` with the app running again, and a
handle's failed calls meanwhile.

    python benchmarks/takeover_bench.py [--load-s 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from _common import say, two_ray_nodes

from streamwise.proto import predict_pb2, predict_pb2_grpc

ray = __import__("ray")

_NODE = dict(num_cpus=2, object_store_memory=100 * 2**20)

_DRIVER = """
import json, os, sys, time
import streamwise
from takeover_app import app

cluster = streamwise.RayCluster(address=os.environ["RAY_ADDRESS"], namespace="takeover_bench")
begun = time.perf_counter()
streamwise.run(app, cluster=cluster,
               grpc_options=streamwise.GrpcOptions(host="127.0.0.1", port=int(os.environ["PORT"])))
print(json.dumps({"run_s": time.perf_counter() - begun}), flush=True)
sys.stdin.read()
streamwise.shutdown()
"""


_APP = """
import os, time
import streamwise


@streamwise.deployment(ray_actor_options={"num_cpus": 0, "resources": {"node_b": 1}})
class Model:
    def __init__(self, load_s):
        time.sleep(load_s)  # loading weights

    async def pid(self):
        return os.getpid()


@streamwise.deployment(ray_actor_options={"num_cpus": 0, "resources": {"node_a": 1}})
class Front:
    def __init__(self, model):
        self.model = model

    async def __call__(self, inputs):
        return f"{os.getpid()} {await self.model.pid.remote()}".encode()


app = Front.bind(Model.bind(float(os.environ["LOAD_S"])))
"""


def _write_app(directory: str, version: int) -> None:
    """The app's module, ``takeover_app``; another ``version`` is other code (a comment differs)."""
    with open(os.path.join(directory, "takeover_app.py"), "w") as out:
        out.write(f"{_APP}# version {version}\n")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Driver:
    """The driver script, running ``takeover_app`` (files: their sources are part of the code version)."""

    def __init__(self, directory: str, address: str, port: int, load_s: float, version: int) -> None:
        _write_app(directory, version)
        script = os.path.join(directory, "driver.py")
        with open(script, "w") as out:
            out.write(_DRIVER)
        self.process = subprocess.Popen(
            [sys.executable, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL, text=True,
            env=dict(
                os.environ, RAY_ADDRESS=address, PORT=str(port), LOAD_S=str(load_s),
                PYTHONDONTWRITEBYTECODE="1",  # the app's file changes within a second: no stale .pyc
            ),
        )
        figures = json.loads(self.process.stdout.readline())
        self.run_s = figures["run_s"]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)


class _Client:
    """Calls the port all along, each call on a new connection; counts answers by replica pair."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: dict[str, int] = {}
        self.failures: dict[str, int] = {}  # by status code
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
                    reply = predict_pb2_grpc.PredictAPIsServiceStub(channel).Predict(
                        predict_pb2.PredictRequest(), timeout=30
                    )
                answer = reply.prediction.decode()
                self.answers[answer] = self.answers.get(answer, 0) + 1
            except grpc.RpcError as exc:
                code = exc.code().name
                self.failures[code] = self.failures.get(code, 0) + 1
            time.sleep(0.01)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(60)


def _outcome(client: _Client) -> str:
    """The client's calls, failures (by code), and whether other replicas answered."""
    failed = sum(client.failures.values())
    codes = f" ({', '.join(f'{n} {code}' for code, n in client.failures.items())})" if failed else ""
    restarted = {0: "no answer", 1: "no"}.get(len(client.answers), "yes")
    return f"calls {sum(client.answers.values()):>5}   failed {failed:>3}{codes}   replicas restarted: {restarted}"


def _streamwise(directory: str, address: str, load_s: float) -> None:
    for label, version in (("same code (taken back)", 1), ("other code (replaced)", 2)):
        port = _free_port()
        first = _Driver(directory, address, port, load_s, 1)
        client = _Client(port)
        time.sleep(0.5)
        first.kill()
        launched = time.perf_counter()
        second = _Driver(directory, address, port, load_s, version)
        ready_s = time.perf_counter() - launched
        time.sleep(1.0)
        client.stop()
        second.stop()
        say(f"streamwise, {label:<24} run() {second.run_s:6.2f} s   process start to ready {ready_s:6.2f} s   "
            f"{_outcome(client)}")
    say(f"(the first driver's run(), replicas started: {first.run_s:.2f} s)")


def _restarted(directory: str, address: str, load_s: float) -> None:
    """``streamwise run --restart``: its driver SIGKILLed, until it serves again."""
    import psutil

    _write_app(directory, 1)
    port = _free_port()
    command = subprocess.Popen(
        [sys.executable, "-m", "streamwise.cli", "run", "takeover_app:app", "--cluster", "ray", "--restart",
         "--grpc-host", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", "-1"],
        cwd=directory, stdout=subprocess.PIPE, stderr=None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL,
        text=True, env=dict(os.environ, RAY_ADDRESS=address, LOAD_S=str(load_s)),
    )
    try:
        if "is running" not in command.stdout.readline():
            raise RuntimeError("streamwise run --restart did not start")
        client = _Client(port)
        time.sleep(0.5)
        (driver,) = psutil.Process(command.pid).children()
        killed = time.perf_counter()
        driver.kill()
        if "is running" not in command.stdout.readline():
            raise RuntimeError("the killed driver did not come back")
        back_s = time.perf_counter() - killed
        time.sleep(1.0)
        client.stop()
        command.terminate()
        command.wait(60)
    finally:
        command.kill()
        command.wait()
        command.stdout.close()
    say(f"streamwise run --restart, driver killed   back (app running again) {back_s:6.2f} s   "
        f"{_outcome(client)}")


def _serve(load_s: float) -> None:
    try:
        from ray import serve
    except ImportError:
        say("Ray Serve: not installed (pip install 'ray[serve]' to measure it here too)")
        return

    @serve.deployment(ray_actor_options={"num_cpus": 0, "resources": {"node_b": 1}})
    class ServeModel:
        def __init__(self) -> None:
            time.sleep(load_s)

        def pid(self) -> int:
            return os.getpid()

    handle = serve.run(ServeModel.bind(), name="takeover")
    before = handle.pid.remote().result()
    failures = 0
    calls = 0
    done = threading.Event()

    def call_all_along() -> None:
        nonlocal failures, calls
        while not done.is_set():
            try:
                handle.pid.remote().result(timeout_s=30)
                calls += 1
            except Exception:
                failures += 1
            time.sleep(0.01)

    caller = threading.Thread(target=call_all_along, daemon=True)
    caller.start()
    time.sleep(0.5)
    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    start = time.perf_counter()
    ray.kill(controller, no_restart=False)  # Ray restarts it
    actor_id = controller._actor_id.hex()
    deadline = time.perf_counter() + 60
    while ray._private.state.actors(actor_id=actor_id).get("NumRestarts", 0) < 1:  # it did die (private API)
        if time.perf_counter() > deadline:
            raise RuntimeError("Ray did not restart Serve's controller within 60 s")
        time.sleep(0.01)
    while True:
        try:
            status = serve.status()
            if status.applications["takeover"].status == "RUNNING":
                break
        except Exception:
            pass
        time.sleep(0.05)
    back_s = time.perf_counter() - start
    time.sleep(1.0)
    done.set()
    caller.join(60)
    after = handle.pid.remote().result()
    say(f"Ray Serve, controller killed       back (serve.status RUNNING) {back_s:6.2f} s   calls {calls:>5}   "
        f"failed {failures:>3}   replicas restarted: {'no' if after == before else 'yes'}")
    serve.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load-s", type=float, default=3.0, help="the model's constructor takes this long")
    args = parser.parse_args()
    with two_ray_nodes(_NODE) as address:
        say(f"two Ray nodes on this machine; Front on A calls Model on B, whose constructor takes {args.load_s:.1f} s")
        with tempfile.TemporaryDirectory() as directory:
            _streamwise(directory, address, args.load_s)
            _restarted(directory, address, args.load_s)
        _serve(args.load_s)


if __name__ == "__main__":
    main()
