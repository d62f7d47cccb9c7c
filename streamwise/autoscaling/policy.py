"""The autoscaling decision: from a deployment's averaged load to a replica count.

:class:`Decider` is pure bookkeeping (no clock of its own, no I/O): the controller
calls :meth:`Decider.decide` on every tick with the time and the load it averaged,
and scales to what it returns. That keeps the rule testable without processes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from streamwise.config import AutoscalingConfig

log = logging.getLogger("streamwise.autoscaling")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoscalingContext:
    """What a custom ``AutoscalingConfig.policy`` sees on each decision.

    ``ongoing_requests`` and ``queued_requests`` are totals over the deployment's
    replicas and callers, each averaged over ``look_back_period_s``; ``state`` is a
    dict kept for the policy between calls (it may store anything there).
    """

    application: str
    deployment: str
    current_replicas: int  # the count asked for now (some may still be starting)
    running_replicas: int
    ongoing_requests: float
    queued_requests: float
    config: AutoscalingConfig
    now: float  # time.monotonic() of this decision
    last_scale_time: float | None
    state: dict[str, Any]

    @property
    def total_requests(self) -> float:
        return self.ongoing_requests + self.queued_requests


def wanted(config: AutoscalingConfig, current: int, load: float) -> int:
    """Replicas for ``load`` calls at ``target_ongoing_requests`` each, moved from
    ``current`` by the scaling factors, within the bounds (never 0 while load > 0)."""
    raw = load / config.target_ongoing_requests
    if current == 0:
        step = raw
    else:
        factor = config.upscaling_factor if raw > current else config.downscaling_factor
        step = current + factor * (raw - current)
    n = math.ceil(step - 1e-9)
    if load > 0:
        n = max(n, 1)
    return config.clamp(n)


class Decider:
    """Applies the delays: a count other than the current one must be wanted for
    ``upscale_delay_s`` (more) or ``downscale_delay_s`` (fewer) before it is taken.

    From zero replicas a call waiting is enough: scaling up is immediate.
    """

    def __init__(self, application: str, deployment: str, config: AutoscalingConfig) -> None:
        self.application = application
        self.deployment = deployment
        self.config = config
        self._up_since: float | None = None
        self._down_since: float | None = None
        self._last_scale: float | None = None
        self._state: dict[str, Any] = {}

    def decide(self, now: float, current: int, running: int, ongoing: float, queued: float) -> int:
        """The replica count to run from ``now`` (``current`` if nothing changes)."""
        config = self.config
        if config.policy is not None:
            n = self._custom(now, current, running, ongoing, queued)
        else:
            n = self._delayed(now, current, wanted(config, current, ongoing + queued))
        if n != current:
            self._last_scale = now
            self._up_since = self._down_since = None
        return n

    def _delayed(self, now: float, current: int, target: int) -> int:
        if current == 0 and target > 0:
            return target
        if target > current:
            self._down_since = None
            if self._up_since is None:
                self._up_since = now
            return target if now - self._up_since >= self.config.upscale_delay_s else current
        if target < current:
            self._up_since = None
            if self._down_since is None:
                self._down_since = now
            return target if now - self._down_since >= self.config.downscale_delay_s else current
        self._up_since = self._down_since = None
        return current

    def _custom(self, now: float, current: int, running: int, ongoing: float, queued: float) -> int:
        context = AutoscalingContext(
            application=self.application,
            deployment=self.deployment,
            current_replicas=current,
            running_replicas=running,
            ongoing_requests=ongoing,
            queued_requests=queued,
            config=self.config,
            now=now,
            last_scale_time=self._last_scale,
            state=self._state,
        )
        assert self.config.policy is not None
        try:
            n = self.config.policy(context)
        except Exception:
            log.exception("the autoscaling policy of %r raised; keeping %d replicas", self.deployment, current)
            return current
        if not isinstance(n, int) or isinstance(n, bool):
            log.error(
                "the autoscaling policy of %r returned %r, not an int; keeping %d replicas",
                self.deployment, n, current,
            )
            return current
        return self.config.clamp(n)
