import signal
import subprocess
import sys
import textwrap

import psutil

APP = textwrap.dedent(
    """
    import streamwise

    @streamwise.deployment
    class Hello:
        async def __call__(self):
            return "hi"

    app = Hello.bind()
    """
)


def test_cli_runs_until_sigint_then_exits_cleanly(tmp_path):
    """`streamwise run mod:app` serves until SIGINT, then exits 0 with no replica left."""
    (tmp_path / "hello_app.py").write_text(APP)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamwise.cli", "run", "hello_app:app", "--metrics-port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        assert "is running" in first and "metrics on http://127.0.0.1:" in first
        replicas = psutil.Process(proc.pid).children(recursive=True)
        assert len(replicas) == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(replicas, timeout=10)
        assert not alive
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_cli_bad_target_is_a_clear_error(tmp_path):
    """A target that cannot be imported exits 1 naming the module."""
    out = subprocess.run(
        [sys.executable, "-m", "streamwise.cli", "run", "no_such_module:app"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "no_such_module" in out.stderr


def test_cli_serves_grpc_until_sigterm(tmp_path):
    """`streamwise run mod:app --grpc-port 0` serves Predict over gRPC, then drains on SIGTERM."""
    import asyncio

    import grpc

    from streamwise.proto import predict_pb2, predict_pb2_grpc

    (tmp_path / "predict_app.py").write_text(
        textwrap.dedent(
            """
            import streamwise

            @streamwise.deployment
            class Upper:
                async def __call__(self, inputs):
                    return inputs["text"].upper()

            app = Upper.bind()
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamwise.cli", "run", "predict_app:app", "--grpc-port", "0", "--grpc-host", "127.0.0.1",
         "--metrics-port", "-1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "gRPC on 127.0.0.1:" in line
        address = line.split("gRPC on ")[1].split(")")[0]

        async def call():
            async with grpc.aio.insecure_channel(address) as channel:
                stub = predict_pb2_grpc.PredictAPIsServiceStub(channel)
                return (await stub.Predict(predict_pb2.PredictRequest(input={"text": b"hi"}))).prediction

        assert asyncio.run(call()) == b"HI"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_cli_prints_progress_while_replicas_start_and_drain(tmp_path):
    """`streamwise run` writes a line to stderr as each replica becomes ready
    (1/2, then 2/2 running), and on SIGINT one as each drains (up to 2/2 stopped)."""
    (tmp_path / "pair_app.py").write_text(
        textwrap.dedent(
            """
            import streamwise

            @streamwise.deployment(num_replicas=2)
            class Model:
                async def __call__(self):
                    return "hi"

            app = Model.bind()
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamwise.cli", "run", "pair_app:app", "--name", "x", "--metrics-port", "-1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = []
        for line in iter(proc.stderr.readline, ""):
            started.append(line.strip())
            if "2/2 replicas running" in line:
                break
        assert started[-2:] == [
            "streamwise: app 'x': deployment 'Model' 1/2 replicas running",
            "streamwise: app 'x': deployment 'Model' 2/2 replicas running",
        ], started
        assert "is running" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        drained = [line.strip() for line in proc.stderr if "draining" in line]
        assert drained == [
            "streamwise: app 'x': deployment 'Model' draining, 0/2 replicas stopped",
            "streamwise: app 'x': deployment 'Model' draining, 1/2 replicas stopped",
            "streamwise: app 'x': deployment 'Model' draining, 2/2 replicas stopped",
        ], drained
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_library_run_prints_no_progress(tmp_path):
    """`streamwise.run()` from a program stays quiet: the progress lines are the CLI's."""
    (tmp_path / "quiet.py").write_text(
        textwrap.dedent(
            """
            import streamwise

            @streamwise.deployment
            class Model:
                async def __call__(self):
                    return "hi"

            assert streamwise.run(Model.bind()).remote().result() == "hi"
            streamwise.shutdown()
            print("done")
            """
        )
    )
    out = subprocess.run([sys.executable, "quiet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "done\n", out.stderr
    assert "replicas running" not in out.stderr and "draining" not in out.stderr


def test_cli_restart_starts_a_killed_driver_again_but_not_one_that_exits(tmp_path):
    """`streamwise run --restart`: a driver SIGKILLed is started again (on one
    machine its replicas die with it, so it starts new ones); SIGTERM then stops
    it and the command exits 0. A driver that fails by itself is not restarted:
    the command exits with its code."""
    (tmp_path / "hello_app.py").write_text(APP)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamwise.cli", "run", "hello_app:app", "--metrics-port", "-1", "--restart"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert "is running" in proc.stdout.readline()
        (driver,) = psutil.Process(proc.pid).children()
        driver.kill()
        assert "is running" in proc.stdout.readline()
        (again,) = psutil.Process(proc.pid).children()
        assert again.pid != driver.pid
        replicas = again.children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(replicas, timeout=10)
        assert not alive
        assert "killed by SIGKILL; starting it again" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    failed = subprocess.run(
        [sys.executable, "-m", "streamwise.cli", "run", "no_such_module:app", "--restart"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )
    assert failed.returncode == 1
    assert failed.stderr.count("cannot import") == 1 and "starting it again" not in failed.stderr
