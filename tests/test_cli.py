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
        [sys.executable, "-m", "streamwise.cli", "run", "hello_app:app"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "is running" in proc.stdout.readline()
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
