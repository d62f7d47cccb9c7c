"""``streamwise run --restart``: the driver in a child process, started again if it is killed.

The controller lives in the driver. On a Ray cluster its replicas outlive it
(``actors._outage``) and the app's next driver on the same machine takes them back
(``actors._succession``): so a driver killed by a signal nobody here sent (the OOM
killer's SIGKILL, a crash) is started again, after a short backoff, and goes on
with the same replicas, as Ray restarts Ray Serve's controller. On one machine the
replicas die with their driver, and the new one starts them anew.

This process only waits, and passes SIGINT and SIGTERM on to the driver, which
drains and exits; then this process exits with its code. A driver that exits by
itself (0, or 1 after a failed start) is not started again: nothing would change.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

from streamwise.config import COME_BACK_BACKOFF_S

# A driver that ran this long before it was killed is restarted after the shortest wait.
_STEADY_S = 60.0


def supervise(argv: list[str]) -> int:
    """Run ``streamwise <argv>`` (a ``run`` without ``--restart``) until it exits by
    itself or is stopped through this process; its exit code (128 + the signal for
    one it was stopped by)."""
    stop = threading.Event()
    child: subprocess.Popen[bytes] | None = None

    def forward(sig: int, _frame: object) -> None:
        stop.set()
        if child is not None and child.poll() is None:
            child.send_signal(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    restarts = 0
    while True:
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "streamwise.cli", *argv])
        if stop.is_set():  # stopped while it was being started
            child.send_signal(signal.SIGTERM)
        code = child.wait()
        if code >= 0 or stop.is_set():
            return code if code >= 0 else 128 - code
        restarts = 0 if time.monotonic() - started >= _STEADY_S else restarts + 1
        delay = COME_BACK_BACKOFF_S[min(restarts, len(COME_BACK_BACKOFF_S) - 1)]
        print(
            f"streamwise: the driver (pid {child.pid}) was killed by {signal.Signals(-code).name}; "
            f"starting it again in {delay:.1f}s",
            file=sys.stderr, flush=True,
        )
        if stop.wait(delay):
            return 128 - code
