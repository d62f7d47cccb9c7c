"""Progress lines of ``streamwise run``: replicas starting, and draining at shutdown.

The operator who runs ``streamwise run MOD:APP`` sees on stderr, as each replica
becomes ready::

    app 'shop': deployment 'Model' 1/2 replicas running
    app 'shop': deployment 'Model' 2/2 replicas running

and, when the driver shuts down (Ctrl-C, SIGTERM, ``streamwise shutdown``), as each
one finishes draining::

    app 'shop': deployment 'Model' draining, 1/2 replicas stopped

The library's ``run()`` prints nothing: only the CLI installs this observer
(``api.add_replica_observer``). It runs on the driver's core loop at each change of
a deployment's replicas, so it only counts and writes a line when the count moved.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from streamwise.actors._deployment_state import _Deployment


class ReplicaProgress:
    """Writes a line to ``out`` whenever a deployment's count of running replicas
    (or, once it is stopping, of stopped ones) changes."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out
        self._last: dict[tuple[str, str], str] = {}
        self._draining: dict[tuple[str, str], int] = {}  # replicas a stopping deployment had

    def __call__(self, dep: _Deployment) -> None:
        from streamwise.actors._deployment_state import ReplicaState

        key = (dep.spec.app, dep.config.name)
        states = [replica.state for replica in dep.replicas.values()]
        where = f"app {key[0]!r}: deployment {key[1]!r}"
        if dep.stopping:
            total = self._draining.setdefault(key, len(states))
            stopped = total - sum(state is not ReplicaState.STOPPED for state in states)
            line = f"{where} draining, {stopped}/{total} replicas stopped"
        else:
            self._draining.pop(key, None)
            running = states.count(ReplicaState.RUNNING)
            draining = states.count(ReplicaState.DRAINING)
            line = f"{where} {running}/{dep.config.num_replicas} replicas running"
            if draining:
                line += f" ({draining} draining)"
        if self._last.get(key) != line:
            self._last[key] = line
            out = self._out or sys.stderr
            print(f"streamwise: {line}", file=out, flush=True)
