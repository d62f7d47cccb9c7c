"""A replica whose driver dies: it drains and exits by itself, whatever its user code does."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap

import psutil

DRIVER = textwrap.dedent(
    """
    import os, sys, threading, time
    import streamwise

    @streamwise.deployment(graceful_shutdown_timeout_s=1)
    class Stuck:
        def hang(self, marker):
            open(marker, "w").close()
            threading.Event().wait()  # a sync method that never returns, on a worker thread
            return os.getpid()

    handle = streamwise.run(Stuck.bind())
    marker = sys.argv[1]
    handle.hang.remote(marker)
    while not os.path.exists(marker):
        time.sleep(0.05)
    print("hanging", flush=True)
    sys.stdin.read()  # until killed
    """
)


def _replicas_of(driver: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(driver).children() if "streamwise.actors.replica" in p.cmdline()]


def test_a_replica_whose_driver_died_exits_though_a_thread_is_stuck_in_user_code(tmp_path):
    """The driver is SIGKILLed while a sync method hangs in the replica's thread pool:
    the replica drains for graceful_shutdown_timeout_s, then exits anyway (nothing
    else would ever stop it), instead of waiting for that thread forever."""
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(tmp_path / "started")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    replicas: list[psutil.Process] = []
    try:
        driver.stdout.readline()
        replicas = _replicas_of(driver.pid)
        assert len(replicas) == 1
        driver.kill()
        driver.wait()
        gone, alive = psutil.wait_procs(replicas, timeout=20)
        assert not alive, f"replica still running after its driver died: {alive}"
    finally:
        driver.kill()
        driver.wait()
        driver.stdin.close()
        driver.stdout.close()
        for replica in replicas:
            with contextlib.suppress(psutil.NoSuchProcess):
                replica.send_signal(signal.SIGKILL)
