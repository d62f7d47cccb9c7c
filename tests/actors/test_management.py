"""The management API and the operator's CLI commands, against real drivers and replicas."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import pytest

import streamwise
from streamwise.actors.management import TOKEN_FILE, running_drivers
from streamwise.proto import management_pb2, management_pb2_grpc


@streamwise.deployment(max_ongoing_requests=8, user_config={"greeting": "hello"}, graceful_shutdown_timeout_s=30)
class Greeter:
    def __init__(self):
        self.greeting = ""
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    def reconfigure(self, config):
        if "bad" in config:
            raise ValueError("a config this replica refuses")
        self.greeting = config["greeting"]

    async def greet(self, name: str) -> str:
        return f"{self.greeting} {name}"

    async def pid(self) -> int:
        return os.getpid()

    async def hold(self) -> str:
        self.held.set()
        await self.release.wait()
        return "released"

    async def wait_held(self) -> bool:
        await asyncio.wait_for(self.held.wait(), 10)
        return True

    async def let_go(self) -> None:
        self.release.set()

    async def count(self, n: int, gap_s: float):
        for i in range(n):
            await asyncio.sleep(gap_s)
            yield i


def _management():
    (driver,) = [d for d in running_drivers() if d.pid == os.getpid()]
    channel = grpc.insecure_channel(driver.target)
    return channel, management_pb2_grpc.ManagementStub(channel), driver.metadata()


def _describe(app: str = "default") -> management_pb2.ApplicationStatus:
    channel, stub, metadata = _management()
    with channel:
        return stub.DescribeApplication(management_pb2.DescribeApplicationRequest(application=app), metadata=metadata)


def _scale(deployment: str, n: int, app: str = "default") -> list[management_pb2.DeploymentStatus]:
    channel, stub, metadata = _management()
    with channel:
        request = management_pb2.ScaleDeploymentRequest(application=app, deployment=deployment, num_replicas=n)
        return list(stub.ScaleDeployment(request, metadata=metadata, timeout=60))


def test_describe_shows_each_replica_and_its_load(serve):
    """Describe lists the app's deployment with its running replica: its pid, its
    state, and the calls it runs at that moment."""
    handle = serve(Greeter.bind())
    pid = handle.pid.remote().result()
    held = handle.hold.remote()
    assert handle.wait_held.remote().result()
    app = _describe()
    assert (app.name, app.status, app.root_deployment) == ("default", "RUNNING", "Greeter")
    (dep,) = app.deployments
    assert (dep.name, dep.target_replicas, dep.running_replicas, dep.status) == ("Greeter", 1, 1, "HEALTHY")
    (replica,) = dep.replicas
    assert (replica.state, replica.pid) == ("RUNNING", pid)
    assert replica.ongoing_requests == 1  # the held call
    assert json.loads(dep.config_json)["max_ongoing_requests"] == 8
    handle.let_go.remote().result()
    assert held.result() == "released"


def test_scaling_up_and_down_drops_no_stream(serve):
    """Scaling to 3 starts two replicas (calls then reach all three); scaling back to
    1 drains two, and streams open across the scale-down run to their end."""
    handle = serve(Greeter.bind())
    statuses = _scale("Greeter", 3)
    assert statuses[-1].running_replicas == 3 and statuses[-1].target_replicas == 3
    pids = {handle.pid.remote().result() for _ in range(60)}
    assert len(pids) == 3

    results: list[list[int]] = []

    def consume() -> None:
        results.append(list(handle.count.remote(20, 0.02)))

    streams = [threading.Thread(target=consume) for _ in range(6)]
    for thread in streams:
        thread.start()
    statuses = _scale("Greeter", 1)
    for thread in streams:
        thread.join(60)
    assert results == [list(range(20))] * 6  # every stream whole
    final = statuses[-1]
    assert (final.running_replicas, final.target_replicas, len(final.replicas)) == (1, 1, 1)
    assert any(r.state == "DRAINING" for s in statuses for r in s.replicas)  # it drained on the way
    assert handle.greet.remote("ada").result() == "hello ada"


def test_user_config_update_reaches_live_replicas(serve):
    """UpdateUserConfig calls reconfigure() on every live replica; replicas started
    later get the new config too."""
    handle = serve(Greeter.options(num_replicas=2).bind())
    channel, stub, metadata = _management()
    with channel:
        stub.UpdateUserConfig(
            management_pb2.UpdateUserConfigRequest(
                application="default", deployment="Greeter", user_config_json='{"greeting": "hi"}'
            ),
            metadata=metadata,
        )
    # reconfigure() runs as each replica reads its control stream: wait until both
    # answer with it (40 calls in a row land on both replicas).
    for _ in range(50):
        answers = {handle.greet.remote("bob").result() for _ in range(40)}
        if answers == {"hi bob"}:
            break
    assert answers == {"hi bob"}
    _scale("Greeter", 3)
    assert {handle.greet.remote("eve").result() for _ in range(30)} == {"hi eve"}


def test_scaling_down_while_scaling_up_leaves_exactly_the_target(serve):
    """A scale-down that arrives while replicas of a scale-up are still starting
    retires them too: both calls return, and one replica process is left."""
    import psutil

    handle = serve(Greeter.bind())
    up = threading.Thread(target=_scale, args=("Greeter", 4))
    up.start()
    while _describe().deployments[0].target_replicas != 4:  # the scale-up has begun
        time.sleep(0.005)
    down = _scale("Greeter", 1)
    up.join(60)
    assert not up.is_alive()
    final = _describe().deployments[0]
    assert (final.target_replicas, final.running_replicas, len(final.replicas)) == (1, 1, 1)
    assert down[-1].running_replicas == 1
    assert len(psutil.Process().children()) == 1
    assert handle.greet.remote("ada").result() == "hello ada"


def test_a_refused_user_config_leaves_the_replica_serving(serve):
    """A reconfigure() that raises is logged; the replica keeps its old config and serves."""
    handle = serve(Greeter.bind())
    channel, stub, metadata = _management()
    with channel:
        stub.UpdateUserConfig(
            management_pb2.UpdateUserConfigRequest(
                application="default", deployment="Greeter", user_config_json='{"bad": 1}'
            ),
            metadata=metadata,
        )
    pid = handle.pid.remote().result()
    for _ in range(20):
        assert handle.greet.remote("ada").result() == "hello ada"
    assert handle.pid.remote().result() == pid  # the same process: it did not stop


def test_errors_name_what_exists(serve):
    """An unknown application or deployment is NOT_FOUND naming what runs; a bad
    user_config is INVALID_ARGUMENT; the app keeps serving."""
    handle = serve(Greeter.bind())
    channel, stub, metadata = _management()
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.DescribeApplication(management_pb2.DescribeApplicationRequest(application="nope"), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "default" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(
                stub.ScaleDeployment(
                    management_pb2.ScaleDeploymentRequest(application="default", deployment="Nope", num_replicas=2),
                    metadata=metadata,
                )
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "default/Greeter" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.UpdateUserConfig(
                management_pb2.UpdateUserConfigRequest(
                    application="default", deployment="Greeter", user_config_json="{not json"
                ),
                metadata=metadata,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert handle.greet.remote("ada").result() == "hello ada"


def test_management_needs_its_token(serve):
    """The management socket refuses calls without the token, which only this user can read."""
    serve(Greeter.bind())
    (driver,) = [d for d in running_drivers() if d.pid == os.getpid()]
    assert stat.S_IMODE(os.stat(os.path.join(driver.run_dir, TOKEN_FILE)).st_mode) == 0o600
    with grpc.insecure_channel(driver.target) as channel:
        stub = management_pb2_grpc.ManagementStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListApplications(management_pb2.ListApplicationsRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_delete_application_drains_it(serve):
    """DeleteApplication stops the app's replicas; the list is then empty."""
    serve(Greeter.bind())
    channel, stub, metadata = _management()
    with channel:
        stub.DeleteApplication(management_pb2.DeleteApplicationRequest(application="default"), metadata=metadata)
        assert list(stub.ListApplications(management_pb2.ListApplicationsRequest(), metadata=metadata).applications) == []


_APP = textwrap.dedent(
    """
    import streamwise

    @streamwise.deployment
    class Echo:
        async def __call__(self, x):
            return x

    app = Echo.bind()
    """
)


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamwise.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_cli_status_scale_config_shutdown(tmp_path):
    """Against `streamwise run`: status (table and JSON), scale with progress, config,
    and shutdown, which makes the driver drain and exit 0."""
    (tmp_path / "echo_app.py").write_text(_APP)
    driver = subprocess.Popen(
        [sys.executable, "-m", "streamwise.cli", "run", "echo_app:app", "--name", "shop", "--metrics-port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "is running" in driver.stdout.readline()
        table = _cli("status", cwd=tmp_path)
        assert table.returncode == 0, table.stderr
        assert "shop" in table.stdout and "Echo#" in table.stdout and "RUNNING" in table.stdout
        scaled = _cli("scale", "shop", "Echo", "2", cwd=tmp_path)
        assert scaled.returncode == 0, scaled.stderr
        assert scaled.stdout.strip().splitlines()[-1] == "Echo: 2/2 running"
        status = json.loads(_cli("status", "--json", cwd=tmp_path).stdout)
        (app,) = [a for a in status["applications"] if a["driver_pid"] == driver.pid]
        (dep,) = app["deployments"]
        assert app["name"] == "shop" and dep["name"] == "Echo" and dep["running_replicas"] == 2
        assert [r["state"] for r in dep["replicas"]] == ["RUNNING", "RUNNING"]
        assert dep["config"]["num_replicas"] == 2
        config = json.loads(_cli("config", "shop", cwd=tmp_path).stdout)
        assert config["deployments"]["Echo"]["num_replicas"] == 2
        missing = _cli("scale", "nope", "Echo", "1", cwd=tmp_path)
        assert missing.returncode == 1 and "nope" in missing.stderr
        assert _cli("shutdown", "shop", cwd=tmp_path).returncode == 0
        assert driver.wait(timeout=60) == 0
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        driver.stdout.close()


_TALKER = textwrap.dedent(
    """
    import logging
    import streamwise

    @streamwise.deployment
    class Talker:
        def __init__(self):
            print("talker ready", flush=True)
            logging.getLogger("talker").warning("warming up")  # to stderr

        def __call__(self, x):
            return x

    app = Talker.bind()
    """
)


def test_replica_output_reaches_the_operator_and_streamwise_logs(tmp_path):
    """A replica's prints (stdout) and logging (stderr) show in the driver's stdout and
    stderr behind its id and pid, and `streamwise logs APP` prints them from the
    replica's log file."""
    (tmp_path / "talker_app.py").write_text(_TALKER)
    driver = subprocess.Popen(
        [sys.executable, "-m", "streamwise.cli", "run", "talker_app:app", "--name", "chat", "--metrics-port", "-1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = []
        for line in iter(driver.stdout.readline, ""):
            seen.append(line)
            if "is running" in line:
                break
        status = json.loads(_cli("status", "--json", cwd=tmp_path).stdout)
        (app,) = [a for a in status["applications"] if a["driver_pid"] == driver.pid]
        replica = app["deployments"][0]["replicas"][0]
        logs = _cli("logs", "chat", cwd=tmp_path)
        assert logs.returncode == 0, logs.stderr
        assert f"({replica['replica_id']}) talker ready" in logs.stdout
        assert f"({replica['replica_id']}) warming up" in logs.stdout
        assert _cli("logs", "chat", "Nobody", cwd=tmp_path).stdout == ""
        assert _cli("shutdown", "chat", cwd=tmp_path).returncode == 0
        assert driver.wait(timeout=60) == 0
        out = "".join(seen) + driver.stdout.read()
        assert f"({replica['replica_id']} pid={replica['pid']}) talker ready" in out
        assert f"({replica['replica_id']} pid={replica['pid']}) warming up" in driver.stderr.read()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        driver.stdout.close()
        driver.stderr.close()
