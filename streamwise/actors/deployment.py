"""``@deployment`` and ``.bind()``: declaring deployments and wiring them into an app."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, overload

from streamwise.actors._methods import MethodKind, methods_of
from streamwise.config import DeploymentConfig
from streamwise.exceptions import UsageError


class Deployment:
    """A class or function declared as a deployment; ``bind()`` it to build an app."""

    def __init__(self, target: type | Callable[..., Any], config: DeploymentConfig) -> None:
        if not (isinstance(target, type) or inspect.isfunction(target)):
            raise UsageError(f"@deployment takes a class or a function, not {target!r}")
        self._target = target
        self._config = config
        self._methods: Mapping[str, MethodKind] = methods_of(target)

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def config(self) -> DeploymentConfig:
        return self._config

    @property
    def target(self) -> type | Callable[..., Any]:
        return self._target

    @property
    def methods(self) -> Mapping[str, MethodKind]:
        return self._methods

    def options(self, **changes: Any) -> Deployment:
        """A copy of this deployment with some options changed (validated now).

        A fixed ``num_replicas`` replaces the deployment's ``autoscaling_config``, and
        an ``autoscaling_config`` replaces its fixed ``num_replicas``.
        """
        if _is_count(changes.get("num_replicas")) and "autoscaling_config" not in changes:
            changes["autoscaling_config"] = None
        if changes.get("autoscaling_config") is not None and "num_replicas" not in changes \
                and _is_count(self._config.num_replicas):
            changes["num_replicas"] = None
        try:
            config = dataclasses.replace(self._config, **changes)
        except TypeError as exc:
            raise UsageError(f"invalid option for deployment {self.name!r}: {exc}") from None
        return Deployment(self._target, config)

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """Bind constructor arguments; bound deployments among them arrive as handles."""
        if not isinstance(self._target, type) and (args or kwargs):
            raise UsageError(f"function deployment {self.name!r} takes no bind() arguments")
        return Application(self, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UsageError(
            f"deployment {self.name!r} is not called directly: use "
            f"streamwise.run({self.name}.bind(...)) and call the returned handle"
        )

    def __repr__(self) -> str:
        config = self._config
        scale = f"autoscaling_config={config.autoscaling_config}" if config.autoscaling_config else \
            f"num_replicas={config.start_replicas}"
        return f"Deployment(name={self.name!r}, {scale})"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, eq=False)
class Application:
    """A deployment with its constructor arguments: a node of the app graph."""

    deployment: Deployment
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]


@overload
def deployment(_target: type | Callable[..., Any]) -> Deployment: ...


@overload
def deployment(
    _target: None = None, **options: Any
) -> Callable[[type | Callable[..., Any]], Deployment]: ...


def deployment(_target: Any = None, **options: Any) -> Any:
    """Declare a class (or function) as a deployment; options are validated here.

    Options: ``name``, ``num_replicas`` (an int, or ``"auto"``), ``autoscaling_config``
    (a :class:`AutoscalingConfig`), ``max_ongoing_requests``, ``max_queued_requests``, ``user_config``,
    ``health_check_period_s``, ``health_check_timeout_s``,
    ``graceful_shutdown_timeout_s``, ``coalesce`` (a :class:`CoalesceConfig` for the
    frames of every stream; see :class:`streamwise.config.DeploymentConfig`).
    """

    def wrap(target: Any) -> Deployment:
        opts = dict(options)
        name = opts.pop("name", None) or getattr(target, "__name__", None)
        try:
            config = DeploymentConfig(name=name, **opts)
        except TypeError as exc:
            raise UsageError(f"invalid @deployment option for {name!r}: {exc}") from None
        return Deployment(target, config)

    if _target is not None:
        return wrap(_target)
    return wrap
