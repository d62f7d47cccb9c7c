"""Turning a bound app graph into what each replica needs to start."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from streamwise.actors._methods import MethodKind
from streamwise.actors.deployment import Application, Deployment
from streamwise.config import DeploymentConfig, GrpcOptions, TracingConfig
from streamwise.exceptions import UsageError
from streamwise.routing.handle import DeploymentHandle


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrontSpec:
    """How a root replica serves external clients itself (``GrpcOptions.direct``)."""

    options: GrpcOptions  # the port is the one the driver reserved (never 0)
    table_address: str  # the driver's FrontTable service: the apps served on the port


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReplicaSpec:
    """Everything a replica process needs to build its user object (cloudpickled)."""

    app: str
    config: DeploymentConfig
    target: Any
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    methods: Mapping[str, MethodKind]
    # Set on the ingress deployment of an app served over gRPC: the user's
    # add_XServicer_to_server functions, whose RPCs the replica decodes and encodes.
    servicer_functions: tuple[Any, ...] | None = None
    tracing: TracingConfig | None = None
    # Set on the root deployment of an app served directly: listen on the public port.
    front: FrontSpec | None = None

    def instantiate(self) -> Any:
        if isinstance(self.target, type):
            return self.target(*self.args, **self.kwargs)
        return self.target  # a function deployment serves the function itself as __call__


@dataclasses.dataclass(frozen=True)
class AppPlan:
    """The deployments of one app, dependencies first, and the root deployment's name."""

    name: str
    specs: tuple[ReplicaSpec, ...]
    root: ReplicaSpec

    def root_handle(self) -> DeploymentHandle:
        return DeploymentHandle(self.root.config.name, self.name, self.root.methods)


def plan_app(
    root: Application,
    app: str,
    servicer_functions: tuple[Any, ...] | None = None,
    tracing: TracingConfig | None = None,
    front: FrontSpec | None = None,
) -> AppPlan:
    """Walk the bound graph; bound deployments among arguments become handles.

    ``servicer_functions`` (when the app is served over gRPC) and ``front`` (when its
    root replicas listen on the public port) go to the root's spec; ``tracing`` to
    every spec.
    """
    if not isinstance(root, Application):
        raise UsageError(f"run() takes a bound deployment (Deployment.bind(...)), not {root!r}")
    specs: dict[str, ReplicaSpec] = {}
    seen: dict[str, Application] = {}

    def visit(node: Application) -> DeploymentHandle:
        dep: Deployment = node.deployment
        earlier = seen.get(dep.name)
        if earlier is not None:
            if earlier is not node:
                raise UsageError(
                    f"app {app!r} binds two different deployments named {dep.name!r}; "
                    "give one another name with .options(name=...)"
                )
        else:
            seen[dep.name] = node
            args = tuple(convert(a) for a in node.args)
            kwargs = {k: convert(v) for k, v in node.kwargs.items()}
            specs[dep.name] = ReplicaSpec(
                app=app,
                config=dep.config,
                target=dep.target,
                args=args,
                kwargs=kwargs,
                methods=dep.methods,
                tracing=tracing,
            )
        return DeploymentHandle(dep.name, app, dep.methods)

    def convert(value: Any) -> Any:
        if isinstance(value, Application):
            return visit(value)
        if isinstance(value, Deployment):
            raise UsageError(f"pass {value.name}.bind(...) rather than the unbound deployment {value.name!r}")
        if isinstance(value, (list, tuple)):
            return type(value)(convert(v) for v in value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    visit(root)
    root_name = root.deployment.name
    if servicer_functions is not None:
        specs[root_name] = dataclasses.replace(
            specs[root_name], servicer_functions=tuple(servicer_functions), front=front
        )
    return AppPlan(app, tuple(specs.values()), specs[root_name])
