"""``streamwise run --restart``: the driver in a child process, started again if it is killed.

The controller lives in the driver. On a Ray cluster its replicas outlive it
(``actors._outage``) and the app's next driver on the same machine takes them back
(``actors._succession``): so a driver killed by a signal it does not handle (the
OOM killer's SIGKILL, SIGSEGV, SIGHUP) is started again, after 0.1 s growing to 2 s,
and goes on with the same replicas, as Ray restarts Ray Serve's controller. On one
machine the replicas die with their driver, and the new one starts them anew.

This process only waits, and passes SIGINT and SIGTERM on to the driver, which
drains and exits; then this process exits with its code. A driver that exits by
itself is not started again: with 0 after SIGINT or SIGTERM (sent to it directly,
or ``streamwise shutdown``), or with 1 after an error such as a failed start, where
starting it again would change nothing. Stopped while the driver is down, this
process exits 0 at once (on a cluster, the dead driver's replicas end after their
grace).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from streamwise.config import COME_BACK_BACKOFF_S

# A driver that ran this long before it was killed is restarted after the shortest wait.
_STEADY_S = 60.0


def supervise(argv: list[str]) -> int:
    """Run ``streamwise <argv>`` (a ``run`` without ``--restart``) until it exits by
    itself or is stopped through this process; its exit code (128 + the signal that
    ended it; 0 if stopped while it was down)."""
    stopping: list[int] = []  # the signal that stops it (a list: set from the handler)
    child: subprocess.Popen[bytes] | None = None

    def forward(sig: int, _frame: object) -> None:
        stopping.append(sig)
        if child is not None and child.poll() is None:
            child.send_signal(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    restarts = 0
    while True:
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "streamwise.cli", *argv])
        if stopping:  # stopped while it was being started
            child.send_signal(stopping[0])
        code = child.wait()
        if code >= 0 or stopping:
            return code if code >= 0 else 128 - code
        if time.monotonic() - started >= _STEADY_S:
            restarts = 0
        delay = COME_BACK_BACKOFF_S[min(restarts, len(COME_BACK_BACKOFF_S) - 1)]
        restarts += 1
        print(
            f"streamwise: the driver (pid {child.pid}) was killed by {signal.Signals(-code).name}; "
            f"starting it again in {delay:.1f}s",
            file=sys.stderr, flush=True,
        )
        deadline = time.monotonic() + delay
        while not stopping and time.monotonic() < deadline:  # (no lock a signal handler could need)
            time.sleep(0.02)
        if stopping:
            return 0
