"""streamwise: streaming-first serving of Python code as multi-process actors.

How the parts fit: ``@deployment`` marks a class whose replicas are OS processes
(``actors/``). ``run()`` starts a controller in this process, which launches the
replicas and pushes their addresses to every router. A ``DeploymentHandle``
(``routing/``) sends each call through a router (power of two choices, retry with
backoff) over gRPC to a replica, whose servicer (``streaming/``) runs the user method
and sends what an async generator yields back in frames as it is produced. The
gRPC ingress (``streaming/ingress.py``) forwards external clients' RPCs, undecoded,
to an app's root deployment through the same routers. Large arguments and results
travel by reference through node-local shared memory (``objectstore/``: ``put``,
``get``, ``ObjectRef``) unless a handle chooses ``by_reference=False``, which sends
everything inline over gRPC. ``batching/`` groups calls and stream items;
``tracing/`` follows each request across processes.
"""

import os as _os

# gRPC core logs routine connection events (a GOAWAY from a replica that shuts down)
# at INFO level; keep to errors unless the user chose a verbosity. Must precede the
# first import of grpc to take effect.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from streamwise.actors.api import (  # noqa: E402
    ingress_address,
    management_address,
    management_token_file,
    metrics_address,
    open_app,
    run,
    shutdown,
)
from streamwise.actors.deployment import Application, Deployment, deployment  # noqa: E402
from streamwise.actors.multiplex import get_multiplexed_model_id, multiplexed  # noqa: E402
from streamwise.config import (  # noqa: E402
    AutoscalingConfig,
    DeploymentConfig,
    GrpcOptions,
    HandleOptions,
    ManagementOptions,
    RayCluster,
    RouterConfig,
    TracingConfig,
    TransportConfig,
)
from streamwise.autoscaling.policy import AutoscalingContext  # noqa: E402
from streamwise.objectstore import ObjectRef, get, put  # noqa: E402
from streamwise.routing.handle import DeploymentHandle  # noqa: E402
from streamwise.routing.response import DeploymentResponse, DeploymentResponseGenerator  # noqa: E402
from streamwise.streaming.context import RequestContext, get_request_context  # noqa: E402
from streamwise.batching.batch import batch  # noqa: E402
from streamwise.batching.coalesce import CoalesceConfig, coalesce  # noqa: E402
from streamwise.batching.continuous import BatchRequest, BatchStep, ContinuousBatch  # noqa: E402
from streamwise.batching.stats import BatchStats, BatchStatsLog  # noqa: E402

__all__ = [
    "Application",
    "AutoscalingConfig",
    "AutoscalingContext",
    "BatchRequest",
    "BatchStats",
    "BatchStatsLog",
    "BatchStep",
    "CoalesceConfig",
    "ContinuousBatch",
    "Deployment",
    "DeploymentConfig",
    "DeploymentHandle",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
    "GrpcOptions",
    "HandleOptions",
    "ManagementOptions",
    "ObjectRef",
    "RayCluster",
    "RequestContext",
    "RouterConfig",
    "TracingConfig",
    "TransportConfig",
    "batch",
    "coalesce",
    "deployment",
    "get",
    "get_multiplexed_model_id",
    "get_request_context",
    "ingress_address",
    "management_address",
    "management_token_file",
    "metrics_address",
    "multiplexed",
    "open_app",
    "put",
    "run",
    "shutdown",
]
