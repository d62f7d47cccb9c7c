"""Shared fixtures: every test that runs an app gets a clean runtime and a leak check."""

from __future__ import annotations

import os
import threading

import psutil
import pytest

import streamwise
from streamwise.actors._runtime import RUNTIME


def _streamwise_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("streamwise")}


def _streamwise_shm() -> list[str]:
    """Shared-memory files of object store sessions this process started."""
    mine = f"streamwise-{os.getpid()}-"
    return [name for name in os.listdir("/dev/shm") if name.startswith(mine)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Tests marked both_transports run once per data-path transport.
    if "transport" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_transports"):
        metafunc.parametrize("transport", ["local", "grpc"], indirect=True)


@pytest.fixture
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The data path between processes: same-node sockets (the default here) or gRPC."""
    name = getattr(request, "param", "local")
    monkeypatch.setenv("STREAMWISE_LOCAL_TRANSPORT", "1" if name == "local" else "0")
    return name


@pytest.fixture
def serve(transport):
    """Yield ``streamwise.run``; afterwards shut down and assert nothing is left behind."""
    yield streamwise.run
    credentials = RUNTIME.credentials
    streamwise.shutdown()
    me = psutil.Process()
    children = me.children(recursive=True)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"processes left after shutdown: {alive}"
    assert not _streamwise_threads(), f"threads left after shutdown: {_streamwise_threads()}"
    assert not _streamwise_shm(), f"shared memory left after shutdown: {_streamwise_shm()}"
    if credentials is not None:
        assert not os.path.exists(credentials.run_dir), "run directory left after shutdown"
