"""streamwise: streaming-first serving of Python code as multi-process actors.

How the parts fit: ``@deployment`` marks a class whose replicas are OS processes
(``actors/``). ``run()`` starts a controller in this process, which launches the
replicas and pushes their addresses to every router. A ``DeploymentHandle``
(``routing/``) sends each call through a router (power of two choices, retry with
backoff) over gRPC to a replica, whose servicer (``streaming/``) runs the user method
and sends what an async generator yields back in frames as it is produced.
"""

from streamwise.actors.api import run, shutdown
from streamwise.actors.deployment import Application, Deployment, deployment
from streamwise.config import DeploymentConfig, HandleOptions, RouterConfig
from streamwise.routing.handle import DeploymentHandle
from streamwise.routing.response import DeploymentResponse, DeploymentResponseGenerator
from streamwise.streaming.context import RequestContext, get_request_context

__all__ = [
    "Application",
    "Deployment",
    "DeploymentConfig",
    "DeploymentHandle",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
    "HandleOptions",
    "RequestContext",
    "RouterConfig",
    "deployment",
    "get_request_context",
    "run",
    "shutdown",
]
