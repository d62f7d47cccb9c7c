"""Every option streamwise takes, as frozen keyword-only dataclasses.

Environment variables are read here, once, by :func:`env_router_config` (called
lazily the first time a router is built) and :func:`env_transport_config` (the first
time a handle call or the object store needs it); nothing else in the package reads
``os.environ`` for user-facing settings.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from streamwise.exceptions import UsageError

DEFAULT_NUM_REPLICAS = 1
DEFAULT_MAX_ONGOING_REQUESTS = 5
DEFAULT_HEALTH_CHECK_PERIOD_S = 10.0
DEFAULT_HEALTH_CHECK_TIMEOUT_S = 30.0
DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S = 20.0
DEFAULT_MAX_CONSTRUCTOR_ATTEMPTS = 3

DEFAULT_MAX_BATCH_SIZE = 10
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.01
DEFAULT_MAX_CONCURRENT_BATCHES = 1

# Delays between tries of what should come back by itself: a replica's restart (the
# controller), a stream from a driver out of reach (a replica, ``actors._outage``).
COME_BACK_BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0)
DEFAULT_RETRY_INITIAL_BACKOFF_S = 0.025
DEFAULT_RETRY_BACKOFF_MULTIPLIER = 2.0
DEFAULT_RETRY_MAX_BACKOFF_S = 0.5
DEFAULT_NO_REPLICA_TIMEOUT_S = 30.0

DEFAULT_CONTROLLER_GRACE_S = 60.0  # a replica on a cluster serving on without its driver

DEFAULT_CODEC = "cloudpickle"

DEFAULT_GRPC_PORT = 9000
DEFAULT_GRPC_HOST = "0.0.0.0"
DEFAULT_METRICS_HOST = "127.0.0.1"  # metrics say what runs and how busy it is: local by default
DEFAULT_CLI_METRICS_PORT = 9464  # the port OpenTelemetry's Prometheus exporter uses too
DEFAULT_MAX_MESSAGE_LENGTH = 4 * 1024 * 1024
DEFAULT_REPLICA_WAIT_TIMEOUT_S = 5.0
DEFAULT_INGRESS_DRAIN_TIMEOUT_S = 20.0
# What one external client may hold of the ingress. Connections are also capped at
# half of the process's file descriptor limit, so a flood never starves the app's
# own sockets; a connection that has not finished its handshake after
# handshake_timeout_s, or has run no call for idle_timeout_s, is closed.
DEFAULT_INGRESS_MAX_CONNECTIONS = 4096
DEFAULT_INGRESS_MAX_CONCURRENT_STREAMS = 100
DEFAULT_INGRESS_HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_INGRESS_IDLE_TIMEOUT_S = 300.0
DEFAULT_INGRESS_KEEPALIVE_TIME_S = 60.0
DEFAULT_INGRESS_KEEPALIVE_TIMEOUT_S = 20.0
DEFAULT_INGRESS_MIN_PING_INTERVAL_S = 10.0

# Payloads (arguments, results, stream items) of at least this many bytes travel
# through the shared-memory object store. Around 100 KiB one hop costs about the same
# either way: below, the file operations a stored part needs cost more than the
# copies gRPC makes of an inline payload; above, the store wins fast (about 3x at
# 1 MB). benchmarks/objectstore_bench.py prints this sweep. Ray inlines objects up
# to the same size for the same trade-off (max_direct_call_object_size).
DEFAULT_BY_REFERENCE_THRESHOLD_BYTES = 100 * 1024
DEFAULT_GRPC_MAX_MESSAGE_LENGTH = 4 * 1024 * 1024


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_seconds(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """Knobs of one ``@batch`` function (see :func:`streamwise.batch`)."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S
    max_concurrent_batches: int = DEFAULT_MAX_CONCURRENT_BATCHES
    batch_size_fn: Callable[[list[Any]], int] | None = None
    continuous: bool = False

    def __post_init__(self) -> None:
        _check(
            _is_int(self.max_batch_size) and self.max_batch_size >= 1,
            f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}",
        )
        _check(
            _is_seconds(self.batch_wait_timeout_s) and self.batch_wait_timeout_s >= 0,
            f"batch_wait_timeout_s must be a number >= 0, got {self.batch_wait_timeout_s!r}",
        )
        _check(
            _is_int(self.max_concurrent_batches) and self.max_concurrent_batches >= 1,
            f"max_concurrent_batches must be an int >= 1, got {self.max_concurrent_batches!r}",
        )
        _check(
            self.batch_size_fn is None or callable(self.batch_size_fn),
            f"batch_size_fn must be a callable taking a list of items, got {self.batch_size_fn!r}",
        )
        _check(isinstance(self.continuous, bool), f"continuous must be True or False, got {self.continuous!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CoalesceConfig:
    """How the items one stream yields are grouped into wire frames.

    The default adds no latency: a frame leaves as soon as the transport is free and
    carries whatever piled up meanwhile. ``max_items`` / ``max_bytes`` cap a frame
    (a single item larger than ``max_bytes`` still travels, alone); with
    ``max_delay_s > 0`` the sender may hold an item up to that long to fill a frame,
    never longer.
    """

    max_items: int | None = None
    max_delay_s: float = 0.0
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        for field in ("max_items", "max_bytes"):
            value = getattr(self, field)
            _check(
                value is None or (_is_int(value) and value >= 1),
                f"{field} must be None or an int >= 1, got {value!r}",
            )
        _check(
            _is_seconds(self.max_delay_s) and self.max_delay_s >= 0,
            f"max_delay_s must be a number >= 0, got {self.max_delay_s!r}",
        )

    @property
    def eager(self) -> bool:
        """True for the default policy: no cap, no hold."""
        return self.max_items is None and self.max_bytes is None and self.max_delay_s == 0


DEFAULT_COALESCE = CoalesceConfig()


DEFAULT_AUTO_MAX_REPLICAS = 100  # the upper bound num_replicas="auto" sets

# The ray_actor_options a replica may set (Ray Serve's list), and their kinds.
RAY_ACTOR_OPTIONS: dict[str, tuple[type, ...]] = {
    "num_cpus": (int, float),
    "num_gpus": (int, float),
    "memory": (int, float),
    "object_store_memory": (int, float),
    "resources": (dict,),
    "accelerator_type": (str,),
    "runtime_env": (dict,),
    "label_selector": (dict,),
}


def _check_ray_actor_options(name: str, options: Any) -> None:
    if options is None:
        return
    _check(isinstance(options, Mapping), f"ray_actor_options of {name!r} must be a dict, got {options!r}")
    for key, value in options.items():
        _check(
            key in RAY_ACTOR_OPTIONS,
            f"ray_actor_options of {name!r}: unknown option {key!r} (known: {', '.join(sorted(RAY_ACTOR_OPTIONS))})",
        )
        kinds = RAY_ACTOR_OPTIONS[key]
        _check(
            isinstance(value, kinds) and not isinstance(value, bool),
            f"ray_actor_options of {name!r}: {key} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}",
        )
        if kinds == (int, float):
            _check(value >= 0, f"ray_actor_options of {name!r}: {key} must be >= 0, got {value!r}")
    for key, amount in (options.get("resources") or {}).items():
        _check(
            isinstance(key, str) and _is_number(amount) and amount >= 0,
            f"ray_actor_options of {name!r}: resources must map names to amounts >= 0, got {key!r}: {amount!r}",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RayCluster:
    """Run replicas as Ray actors, placed by Ray's scheduler across a Ray cluster.

    ``address``: the cluster to join (``ray.init(address=...)``; None: the one this
    process already joined, else ``RAY_ADDRESS``, else a local one Ray starts).
    ``namespace``: the Ray namespace of the replicas' actors.
    ``controller_grace_s``: how long a replica goes on serving while it cannot reach
    the driver (its controller), reconnecting meanwhile; past that it drains and
    exits. A network outage the controller's health checks also ride out
    (``health_check_period_s`` + ``health_check_timeout_s``) costs no replica; past
    those, the controller replaces the replica, which stops once it is back. A dead
    driver's replicas serve on for the grace (or until the app's next driver has
    them drain). Needs ``pip install 'streamwise[ray]'``.
    """

    address: str | None = None
    namespace: str = "streamwise"
    controller_grace_s: float = DEFAULT_CONTROLLER_GRACE_S

    def __post_init__(self) -> None:
        _check(self.address is None or (isinstance(self.address, str) and self.address != ""),
               f"address must be None or a Ray address, got {self.address!r}")
        _check(isinstance(self.namespace, str) and self.namespace != "",
               f"namespace must be a non-empty str, got {self.namespace!r}")
        _check(_is_number(self.controller_grace_s) and 0 <= self.controller_grace_s < float("inf"),
               f"controller_grace_s must be a finite number >= 0, got {self.controller_grace_s!r}")


def cluster_config(cluster: Any) -> RayCluster | None:
    """``run(cluster=...)``: "local" (this machine), "ray", a RayCluster, or when
    None, ``STREAMWISE_CLUSTER`` (``ray`` or ``local``, the default; Ray finds its
    cluster through ``RAY_ADDRESS`` as usual)."""
    if cluster is None:
        cluster = os.environ.get("STREAMWISE_CLUSTER", "").strip() or "local"
        if cluster not in ("ray", "local"):
            raise UsageError(f"STREAMWISE_CLUSTER must be ray or local, got {cluster!r}")
    if isinstance(cluster, RayCluster):
        return cluster
    if cluster == "ray":
        return RayCluster()
    if cluster == "local":
        return None
    raise UsageError(f'cluster must be None, "local", "ray" or a streamwise.RayCluster, got {cluster!r}')


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoscalingConfig:
    """How a deployment's replica count follows its load (Ray Serve's names).

    Every ``metrics_interval_s`` each replica reports the calls (and open streams) it
    runs and each router the calls waiting for a replica with room; the controller
    averages each report over ``look_back_period_s`` and wants
    ``ceil((ongoing + queued) / target_ongoing_requests)`` replicas, moved from the
    current count by ``upscaling_factor`` / ``downscaling_factor``, kept within
    ``[min_replicas, max_replicas]``. It scales up once it has wanted more for
    ``upscale_delay_s``, down once it has wanted fewer for ``downscale_delay_s``.
    With ``min_replicas=0`` the deployment scales to zero; the first call then starts
    a replica at once (no delay) and waits for it. ``policy``, a function of an
    :class:`streamwise.AutoscalingContext` returning a replica count, replaces that
    rule; its result is kept within the bounds, and no delay is added to it.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    upscaling_factor: float = 1.0
    downscaling_factor: float = 1.0
    metrics_interval_s: float = 1.0
    look_back_period_s: float = 30.0
    policy: Callable[[Any], int] | None = None

    def __post_init__(self) -> None:
        for field in ("min_replicas", "max_replicas"):
            value = getattr(self, field)
            _check(_is_int(value) and value >= 0, f"{field} must be an int >= 0, got {value!r}")
        _check(self.max_replicas >= 1, f"max_replicas must be >= 1, got {self.max_replicas!r}")
        _check(
            self.min_replicas <= self.max_replicas,
            f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})",
        )
        _check(
            self.initial_replicas is None
            or (_is_int(self.initial_replicas) and self.min_replicas <= self.initial_replicas <= self.max_replicas),
            f"initial_replicas must be None or an int within [min_replicas, max_replicas] = "
            f"[{self.min_replicas}, {self.max_replicas}], got {self.initial_replicas!r}",
        )
        for field in ("target_ongoing_requests", "upscaling_factor", "downscaling_factor",
                      "metrics_interval_s", "look_back_period_s"):
            value = getattr(self, field)
            _check(_is_seconds(value) and value > 0, f"{field} must be a number > 0, got {value!r}")
        for field in ("upscale_delay_s", "downscale_delay_s"):
            value = getattr(self, field)
            _check(_is_seconds(value) and value >= 0, f"{field} must be a number >= 0, got {value!r}")
        _check(
            self.policy is None or callable(self.policy),
            f"policy must be None or a function of an AutoscalingContext returning an int, got {self.policy!r}",
        )

    @property
    def start_replicas(self) -> int:
        """Replicas to start with: ``initial_replicas``, else ``min_replicas``."""
        return self.min_replicas if self.initial_replicas is None else self.initial_replicas

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeploymentConfig:
    """Options of one deployment, set by ``@deployment(...)`` or ``.options(...)``."""

    name: str
    # An int, "auto" (autoscaling, 1 to 100 replicas unless autoscaling_config says
    # otherwise), or None: 1 replica, or autoscaling_config's start.
    num_replicas: int | str | None = None
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS
    user_config: Any = None
    health_check_period_s: float = DEFAULT_HEALTH_CHECK_PERIOD_S
    health_check_timeout_s: float = DEFAULT_HEALTH_CHECK_TIMEOUT_S
    graceful_shutdown_timeout_s: float = DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S
    max_constructor_attempts: int = DEFAULT_MAX_CONSTRUCTOR_ATTEMPTS
    coalesce: CoalesceConfig = DEFAULT_COALESCE  # stream framing of methods without @coalesce
    # Calls one caller may have waiting for a replica with room; past it a call fails at
    # once with BackPressureError (RESOURCE_EXHAUSTED at the ingress). -1: no limit.
    max_queued_requests: int = -1
    autoscaling_config: AutoscalingConfig | None = None
    # Where replicas run when the app runs on a cluster (run(..., cluster="ray")):
    # resources each replica reserves, as Ray Serve's ray_actor_options, and at
    # most this many replicas of the deployment on one node. Ignored on one machine.
    ray_actor_options: Mapping[str, Any] | None = None
    max_replicas_per_node: int | None = None

    def __post_init__(self) -> None:
        _check(bool(self.name) and isinstance(self.name, str), "deployment name must be a non-empty str")
        _check(
            self.num_replicas is None or self.num_replicas == "auto"
            or (_is_int(self.num_replicas) and self.num_replicas >= 1),
            f"num_replicas of {self.name!r} must be an int >= 1 or \"auto\", got {self.num_replicas!r}",
        )
        autoscaling = self.autoscaling_config
        if isinstance(autoscaling, dict):
            try:
                autoscaling = AutoscalingConfig(**autoscaling)
            except TypeError as exc:
                raise UsageError(f"autoscaling_config of {self.name!r}: {exc}") from None
        _check(
            autoscaling is None or isinstance(autoscaling, AutoscalingConfig),
            f"autoscaling_config of {self.name!r} must be a streamwise.AutoscalingConfig or a dict, "
            f"got {autoscaling!r}",
        )
        _check(
            autoscaling is None or not _is_int(self.num_replicas),
            f"{self.name!r} sets both num_replicas={self.num_replicas!r} and autoscaling_config: "
            "set one (num_replicas=\"auto\" goes with autoscaling_config)",
        )
        _check_ray_actor_options(self.name, self.ray_actor_options)
        _check(
            self.max_replicas_per_node is None or (_is_int(self.max_replicas_per_node) and self.max_replicas_per_node >= 1),
            f"max_replicas_per_node of {self.name!r} must be None or an int >= 1, got {self.max_replicas_per_node!r}",
        )
        if self.num_replicas == "auto" and autoscaling is None:
            autoscaling = AutoscalingConfig(max_replicas=DEFAULT_AUTO_MAX_REPLICAS)
        object.__setattr__(self, "autoscaling_config", autoscaling)
        _check(
            isinstance(self.max_ongoing_requests, int) and self.max_ongoing_requests >= 1,
            f"max_ongoing_requests of {self.name!r} must be an int >= 1, "
            f"got {self.max_ongoing_requests!r}",
        )
        for field in ("health_check_period_s", "health_check_timeout_s", "graceful_shutdown_timeout_s"):
            value = getattr(self, field)
            _check(
                isinstance(value, (int, float)) and value > 0,
                f"{field} of {self.name!r} must be a number > 0, got {value!r}",
            )
        _check(
            isinstance(self.max_constructor_attempts, int) and self.max_constructor_attempts >= 1,
            f"max_constructor_attempts of {self.name!r} must be an int >= 1",
        )
        _check(
            _is_int(self.max_queued_requests) and self.max_queued_requests >= -1,
            f"max_queued_requests of {self.name!r} must be an int >= -1 (-1: no limit), "
            f"got {self.max_queued_requests!r}",
        )
        _check(
            isinstance(self.coalesce, CoalesceConfig),
            f"coalesce of {self.name!r} must be a streamwise.CoalesceConfig, got {self.coalesce!r}",
        )

    @property
    def start_replicas(self) -> int:
        """How many replicas the deployment starts with."""
        if self.autoscaling_config is not None:
            return self.autoscaling_config.start_replicas
        return DEFAULT_NUM_REPLICAS if self.num_replicas is None else int(self.num_replicas)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """How a router retries when replicas are full or gone."""

    initial_backoff_s: float = DEFAULT_RETRY_INITIAL_BACKOFF_S
    backoff_multiplier: float = DEFAULT_RETRY_BACKOFF_MULTIPLIER
    max_backoff_s: float = DEFAULT_RETRY_MAX_BACKOFF_S
    no_replica_timeout_s: float = DEFAULT_NO_REPLICA_TIMEOUT_S

    def __post_init__(self) -> None:
        _check(self.initial_backoff_s > 0, "initial_backoff_s must be > 0")
        _check(self.backoff_multiplier >= 1, "backoff_multiplier must be >= 1")
        _check(self.max_backoff_s >= self.initial_backoff_s, "max_backoff_s must be >= initial_backoff_s")
        _check(self.no_replica_timeout_s > 0, "no_replica_timeout_s must be > 0")

    def backoffs(self):
        """Yield successive backoff delays: initial, x multiplier, capped at max."""
        delay = self.initial_backoff_s
        while True:
            yield delay
            delay = min(delay * self.backoff_multiplier, self.max_backoff_s)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise UsageError(f"environment variable {name}={raw!r} is not a number") from None


_router_config: RouterConfig | None = None


def env_router_config() -> RouterConfig:
    """The router config from ``STREAMWISE_ROUTER_RETRY_*`` env vars (read once)."""
    global _router_config
    if _router_config is None:
        _router_config = RouterConfig(
            initial_backoff_s=_env_float(
                "STREAMWISE_ROUTER_RETRY_INITIAL_BACKOFF_S", DEFAULT_RETRY_INITIAL_BACKOFF_S
            ),
            backoff_multiplier=_env_float(
                "STREAMWISE_ROUTER_RETRY_BACKOFF_MULTIPLIER", DEFAULT_RETRY_BACKOFF_MULTIPLIER
            ),
            max_backoff_s=_env_float("STREAMWISE_ROUTER_RETRY_MAX_BACKOFF_S", DEFAULT_RETRY_MAX_BACKOFF_S),
        )
    return _router_config


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransportConfig:
    """How handle calls carry payloads between processes (``STREAMWISE_*`` env vars).

    ``by_reference``: the default of handles that do not choose (False when
    ``STREAMWISE_USE_GRPC_BY_DEFAULT=1``). ``by_reference_threshold_bytes``: smallest
    payload sent through the object store (``STREAMWISE_BY_REFERENCE_THRESHOLD_BYTES``).
    ``grpc_max_message_length``: largest payload sent inline over gRPC
    (``STREAMWISE_GRPC_MAX_MESSAGE_LENGTH``). ``object_store_memory``: bytes the store
    of one driver may hold (``STREAMWISE_OBJECT_STORE_MEMORY``); None means 30% of
    physical memory, at most the size of /dev/shm.
    """

    by_reference: bool = True
    by_reference_threshold_bytes: int = DEFAULT_BY_REFERENCE_THRESHOLD_BYTES
    grpc_max_message_length: int = DEFAULT_GRPC_MAX_MESSAGE_LENGTH
    object_store_memory: int | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.by_reference, bool), "by_reference must be True or False")
        for field in ("by_reference_threshold_bytes", "grpc_max_message_length"):
            value = getattr(self, field)
            _check(isinstance(value, int) and value >= 1, f"{field} must be an int >= 1, got {value!r}")
        _check(
            self.object_store_memory is None
            or (isinstance(self.object_store_memory, int) and self.object_store_memory >= 1),
            f"object_store_memory must be None or an int >= 1, got {self.object_store_memory!r}",
        )


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"environment variable {name}={raw!r} is not an integer") from None


def _env_flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise UsageError(f"environment variable {name}={raw!r} must be 0 or 1")


def env_local_transport() -> bool:
    """Whether calls to replicas on this machine use their Unix socket instead of gRPC.

    ``STREAMWISE_LOCAL_TRANSPORT=0`` sends every call over gRPC; set in the driver's
    environment, it holds for its replicas too (they inherit it). Linux only.
    """
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("STREAMWISE_LOCAL_TRANSPORT", "").strip() == "":
        return True
    return _env_flag("STREAMWISE_LOCAL_TRANSPORT")


def env_grpc_direct() -> bool:
    """The default of ``GrpcOptions.direct``: replicas serve external clients themselves.

    ``STREAMWISE_GRPC_DIRECT=0`` makes the driver's ingress proxy every external call
    instead (``GrpcOptions(direct=...)`` overrides it either way).
    """
    if os.environ.get("STREAMWISE_GRPC_DIRECT", "").strip() == "":
        return True
    return _env_flag("STREAMWISE_GRPC_DIRECT")


EVENT_LOOPS = ("uvloop", "asyncio")


def env_event_loop() -> str:
    """The event loop replicas run on (``streamwise._event_loop``): ``uvloop``, the
    default when it is installed, or ``asyncio``, from ``STREAMWISE_EVENT_LOOP``.

    UsageError for any other value, and for ``uvloop`` when it is not installed.
    """
    raw = os.environ.get("STREAMWISE_EVENT_LOOP", "").strip().lower()
    installed = importlib.util.find_spec("uvloop") is not None
    if raw == "":
        return "uvloop" if installed else "asyncio"
    if raw not in EVENT_LOOPS:
        raise UsageError(f"STREAMWISE_EVENT_LOOP must be one of {', '.join(EVENT_LOOPS)}, got {raw!r}")
    if raw == "uvloop" and not installed:
        raise UsageError("STREAMWISE_EVENT_LOOP=uvloop, but uvloop is not installed (pip install uvloop)")
    return raw


def env_metrics_enabled() -> bool:
    """Whether streamwise records its Prometheus metrics (the default).

    ``STREAMWISE_METRICS=0`` records nothing: it exists to measure what recording
    costs (``benchmarks/metrics_bench.py``). Replicas inherit it from the driver.
    """
    if os.environ.get("STREAMWISE_METRICS", "").strip() == "":
        return True
    return _env_flag("STREAMWISE_METRICS")


def env_internal_auth() -> bool:
    """Whether internal calls must carry the app's secret (the default).

    ``STREAMWISE_INTERNAL_AUTH=0`` is for measuring what the check costs
    (``benchmarks/auth_bench.py``): the app's internal servers then serve any process
    of this user. Other users stay out either way: the sockets are in a private
    directory.
    """
    if os.environ.get("STREAMWISE_INTERNAL_AUTH", "").strip() == "":
        return True
    return _env_flag("STREAMWISE_INTERNAL_AUTH")


_transport_config: TransportConfig | None = None


def env_transport_config() -> TransportConfig:
    """The transport config from ``STREAMWISE_*`` env vars (read once)."""
    global _transport_config
    if _transport_config is None:
        _transport_config = TransportConfig(
            by_reference=not _env_flag("STREAMWISE_USE_GRPC_BY_DEFAULT"),
            by_reference_threshold_bytes=_env_int(
                "STREAMWISE_BY_REFERENCE_THRESHOLD_BYTES", DEFAULT_BY_REFERENCE_THRESHOLD_BYTES
            ),
            grpc_max_message_length=_env_int(
                "STREAMWISE_GRPC_MAX_MESSAGE_LENGTH", DEFAULT_GRPC_MAX_MESSAGE_LENGTH
            ),
            object_store_memory=_env_int("STREAMWISE_OBJECT_STORE_MEMORY", None),
        )
    return _transport_config


@dataclasses.dataclass(frozen=True, kw_only=True)
class HandleOptions:
    """Per-handle call options; ``handle.options(...)`` returns a handle with a replaced copy."""

    method_name: str = "__call__"
    stream: bool | None = None  # None: decided by the method's kind at bind time
    request_serialization: str = DEFAULT_CODEC
    response_serialization: str = DEFAULT_CODEC
    multiplexed_model_id: str = ""  # passed to the replica in the request metadata
    session_id: str = ""  # likewise
    # None: TransportConfig decides (by reference unless STREAMWISE_USE_GRPC_BY_DEFAULT=1).
    by_reference: bool | None = None
    by_reference_threshold_bytes: int | None = None  # None: TransportConfig's
    # The call (a stream: all of it) fails with RequestTimeoutError past this, and is
    # cancelled in the replica; calls made while serving it inherit the deadline.
    request_timeout_s: float | None = None
    # On a cluster: send to replicas on the caller's node while one has room.
    prefer_local_node: bool = True

    def __post_init__(self) -> None:
        from streamwise import codec  # local: codec imports nothing from config

        _check(isinstance(self.prefer_local_node, bool), "prefer_local_node must be True or False")

        _check(isinstance(self.method_name, str) and bool(self.method_name), "method_name must be a str")
        _check(self.stream in (None, True, False), "stream must be True, False or None")
        codec.get_codec(self.request_serialization)
        codec.get_codec(self.response_serialization)
        _check(self.by_reference in (None, True, False), "by_reference must be True, False or None")
        _check(
            self.by_reference_threshold_bytes is None
            or (isinstance(self.by_reference_threshold_bytes, int) and self.by_reference_threshold_bytes >= 1),
            "by_reference_threshold_bytes must be None or an int >= 1",
        )
        _check(
            self.request_timeout_s is None or (_is_number(self.request_timeout_s) and self.request_timeout_s > 0),
            f"request_timeout_s must be None or a number > 0, got {self.request_timeout_s!r}",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class GrpcOptions:
    """How ``run()`` serves the app to external gRPC clients (the ingress).

    ``servicer_functions`` are generated ``add_XServicer_to_server`` functions, or
    ``"pkg.module:add_XServicer_to_server"`` strings; each RPC of those services is
    served by the ingress deployment's method of the same name. The built-in
    ``streamwise.PredictAPIsService`` is always served. ``port=0`` binds a free port
    (see ``streamwise.ingress_address()``). ``ssl_*`` are PEM bytes: a certificate and
    key turn on TLS, and a client CA on top requires clients to present certificates.

    Limits on what clients may hold: ``max_connections`` open at once (at most half
    the process's descriptor limit), ``max_concurrent_streams`` calls per connection,
    ``handshake_timeout_s`` for a new connection to say something, ``idle_timeout_s``
    (None: never) for a connection running no call; the server pings every
    ``keepalive_time_s`` and closes a peer that does not answer within
    ``keepalive_timeout_s``, and closes clients that ping more often than
    ``min_client_ping_interval_s`` while idle. The limits hold per listener: with
    ``direct`` each replica of the root deployment is one.

    ``direct`` (default: on, or ``STREAMWISE_GRPC_DIRECT``): every replica of the
    app's root deployment listens on the public port itself (``SO_REUSEPORT``) and
    runs the calls it accepts in-process while it has room, sending the rest through
    the router; the driver listens only while no root replica runs. ``False``: the
    driver's ingress alone listens and proxies every call to a replica.
    """

    port: int = DEFAULT_GRPC_PORT
    host: str = DEFAULT_GRPC_HOST
    servicer_functions: tuple[Any, ...] = ()
    max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH
    request_timeout_s: float | None = None
    replica_wait_timeout_s: float = DEFAULT_REPLICA_WAIT_TIMEOUT_S
    drain_timeout_s: float = DEFAULT_INGRESS_DRAIN_TIMEOUT_S
    ssl_certificate: bytes | None = None
    ssl_private_key: bytes | None = None
    ssl_client_ca: bytes | None = None
    max_connections: int = DEFAULT_INGRESS_MAX_CONNECTIONS
    max_concurrent_streams: int = DEFAULT_INGRESS_MAX_CONCURRENT_STREAMS
    handshake_timeout_s: float = DEFAULT_INGRESS_HANDSHAKE_TIMEOUT_S
    idle_timeout_s: float | None = DEFAULT_INGRESS_IDLE_TIMEOUT_S
    keepalive_time_s: float = DEFAULT_INGRESS_KEEPALIVE_TIME_S
    keepalive_timeout_s: float = DEFAULT_INGRESS_KEEPALIVE_TIMEOUT_S
    min_client_ping_interval_s: float = DEFAULT_INGRESS_MIN_PING_INTERVAL_S
    direct: bool = dataclasses.field(default_factory=lambda: env_grpc_direct())

    def __post_init__(self) -> None:
        object.__setattr__(self, "servicer_functions", tuple(self.servicer_functions))
        _check(isinstance(self.direct, bool), f"direct must be True or False, got {self.direct!r}")
        for name in ("max_connections", "max_concurrent_streams"):
            value = getattr(self, name)
            _check(_is_int(value) and value > 0, f"{name} must be an int > 0, got {value!r}")
        for name in ("handshake_timeout_s", "keepalive_time_s", "keepalive_timeout_s", "idle_timeout_s"):
            value = getattr(self, name)
            _check(
                (value is None and name == "idle_timeout_s") or (_is_number(value) and value > 0),
                f"{name} must be a number > 0{' or None' if name == 'idle_timeout_s' else ''}, got {value!r}",
            )
        _check(
            _is_number(self.min_client_ping_interval_s) and self.min_client_ping_interval_s >= 0,
            f"min_client_ping_interval_s must be a number >= 0, got {self.min_client_ping_interval_s!r}",
        )
        _check(isinstance(self.port, int) and 0 <= self.port < 65536, f"port must be 0..65535, got {self.port!r}")
        _check(
            isinstance(self.max_message_length, int) and self.max_message_length > 0,
            f"max_message_length must be an int > 0, got {self.max_message_length!r}",
        )
        _check(
            self.request_timeout_s is None or self.request_timeout_s > 0,
            f"request_timeout_s must be None or > 0, got {self.request_timeout_s!r}",
        )
        _check(self.replica_wait_timeout_s > 0, "replica_wait_timeout_s must be > 0")
        _check(self.drain_timeout_s >= 0, "drain_timeout_s must be >= 0")
        for fn in self.servicer_functions:
            _check(
                callable(fn) or (isinstance(fn, str) and ":" in fn),
                f"servicer_functions takes add_XServicer_to_server callables or 'module:function' "
                f"strings, not {fn!r}",
            )
        _check(
            (self.ssl_certificate is None) == (self.ssl_private_key is None),
            "ssl_certificate and ssl_private_key go together",
        )
        _check(
            self.ssl_client_ca is None or self.ssl_certificate is not None,
            "ssl_client_ca (mutual TLS) needs ssl_certificate and ssl_private_key",
        )


DEFAULT_MANAGEMENT_HOST = "127.0.0.1"  # reaching it from other machines is a choice: --management-host 0.0.0.0


def _pem(value: Any, name: str, marker: bytes) -> None:
    _check(
        isinstance(value, bytes) and marker in value,
        f"{name} must be PEM bytes holding {marker.decode().strip('-')} (the file's contents, not its path), "
        f"got {'bytes without it' if isinstance(value, bytes) else repr(value)}",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ManagementOptions:
    """The management API on a TCP port, for operators on other machines.

    Off unless given to ``run()``: the management API is always served on a Unix
    socket in the driver's private run directory; this adds ``host:port`` (0: any
    free port, see ``streamwise.management_address()``). TCP is served with TLS only:
    ``ssl_certificate`` and ``ssl_private_key`` (PEM bytes) are required. Every call
    must also carry the driver's management token (``management.token`` in the run
    directory): TLS alone lets anyone who reaches the port connect. With
    ``ssl_client_ca`` a client must present a certificate signed by that CA too
    (mutual TLS), and still the token. ``ManagementOptions.from_files()`` reads the
    PEM files.
    """

    port: int
    host: str = DEFAULT_MANAGEMENT_HOST
    ssl_certificate: bytes | None = None
    ssl_private_key: bytes | None = dataclasses.field(default=None, repr=False)  # never in a log
    ssl_client_ca: bytes | None = None

    def __post_init__(self) -> None:
        _check(_is_int(self.port) and 0 <= self.port < 65536, f"management port must be 0..65535, got {self.port!r}")
        _check(isinstance(self.host, str) and bool(self.host), f"management host must be a non-empty str, got {self.host!r}")
        _check(
            self.ssl_certificate is not None and self.ssl_private_key is not None,
            "the management API is served on TCP with TLS only: give ssl_certificate and ssl_private_key "
            "(streamwise run --management-cert and --management-key; ssl_certificate_file and "
            "ssl_private_key_file in a config file)",
        )
        _pem(self.ssl_certificate, "ssl_certificate", b"-----BEGIN CERTIFICATE-----")
        _pem(self.ssl_private_key, "ssl_private_key", b"PRIVATE KEY-----")
        if self.ssl_client_ca is not None:
            _pem(self.ssl_client_ca, "ssl_client_ca", b"-----BEGIN CERTIFICATE-----")

    @classmethod
    def from_files(
        cls, *, port: int, host: str = DEFAULT_MANAGEMENT_HOST, ssl_certificate_file: str | None = None,
        ssl_private_key_file: str | None = None, ssl_client_ca_file: str | None = None,
    ) -> ManagementOptions:
        """Options whose PEM values are read from these files (UsageError naming one that cannot be read)."""
        return cls(
            port=port,
            host=host,
            ssl_certificate=read_pem_file(ssl_certificate_file, "ssl_certificate_file"),
            ssl_private_key=read_pem_file(ssl_private_key_file, "ssl_private_key_file"),
            ssl_client_ca=read_pem_file(ssl_client_ca_file, "ssl_client_ca_file"),
        )


def read_pem_file(path: str | None, what: str) -> bytes | None:
    """The bytes of the file ``path`` (None for None); UsageError naming ``what`` if unreadable."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


_MANAGEMENT_ENV = {
    "address": "STREAMWISE_MANAGEMENT_ADDRESS",
    "ca_cert": "STREAMWISE_MANAGEMENT_CA_CERT",
    "token_file": "STREAMWISE_MANAGEMENT_TOKEN_FILE",
    "cert": "STREAMWISE_MANAGEMENT_CERT",
    "key": "STREAMWISE_MANAGEMENT_KEY",
}


def env_management_client() -> dict[str, str | None]:
    """Where the CLI's operator commands reach a remote driver, when no option says:
    ``STREAMWISE_MANAGEMENT_ADDRESS``, ``..._CA_CERT``, ``..._TOKEN_FILE``, ``..._CERT``
    and ``..._KEY`` (None when unset)."""
    return {key: os.environ.get(name) or None for key, name in _MANAGEMENT_ENV.items()}


TRACING_EXPORTERS = ("console", "otlp", "jsonl")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TracingConfig:
    """OpenTelemetry traces of every hop, set up in each streamwise process from this.

    ``exporter`` is ``"console"``, ``"otlp"`` (OTLP over gRPC to ``otlp_endpoint``),
    ``"jsonl"`` (one JSON object per span, appended to files in ``jsonl_dir`` as each
    span ends; read them with ``streamwise trace view``), or a callable returning a list
    of OpenTelemetry span processors (it must be picklable: replicas call it too).
    Sampling is parent-based: a trace started with ``sampling_ratio`` stays whole.

    Left unset, ``otlp_endpoint`` and ``sampling_ratio`` follow the OpenTelemetry
    environment variables, as in any instrumented program: the OTLP exporter reads
    ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT``, ``..._INSECURE``, ``..._CERTIFICATE``
    and ``..._HEADERS`` (default ``http://localhost:4317``), and the ratio comes from
    ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (default 1.0).
    ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` name the processes' resource.
    An ``otlp_endpoint`` without a scheme is reached without TLS; ``https://`` uses TLS.
    """

    enabled: bool = True
    sampling_ratio: float | None = None
    exporter: Any = "jsonl"
    otlp_endpoint: str | None = None
    jsonl_dir: str = "streamwise-traces"

    def __post_init__(self) -> None:
        if self.sampling_ratio is None:
            object.__setattr__(self, "sampling_ratio", _otel_sampling_ratio())
        _check(
            isinstance(self.sampling_ratio, (int, float)) and 0.0 <= self.sampling_ratio <= 1.0,
            f"sampling_ratio must be within [0, 1], got {self.sampling_ratio!r}",
        )
        _check(
            callable(self.exporter) or self.exporter in TRACING_EXPORTERS,
            f"exporter must be one of {TRACING_EXPORTERS} or a callable returning span processors, "
            f"got {self.exporter!r}",
        )


# OTEL_TRACES_SAMPLER values, as streamwise's parent-based ratio (None: from the arg).
_OTEL_SAMPLERS = {
    "always_on": 1.0,
    "parentbased_always_on": 1.0,
    "always_off": 0.0,
    "parentbased_always_off": 0.0,
    "traceidratio": None,
    "parentbased_traceidratio": None,
}


def _otel_sampling_ratio() -> float:
    """The sampling ratio ``OTEL_TRACES_SAMPLER`` (and ``_ARG``) ask for; 1.0 if unset."""
    name = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not name:
        return 1.0
    if name not in _OTEL_SAMPLERS:
        raise UsageError(
            f"environment variable OTEL_TRACES_SAMPLER={name!r}: streamwise samples whole traces by ratio; "
            f"use one of {sorted(_OTEL_SAMPLERS)}"
        )
    ratio = _OTEL_SAMPLERS[name]
    return ratio if ratio is not None else _env_float("OTEL_TRACES_SAMPLER_ARG", 1.0)


def env_otel_service_name() -> str | None:
    """The service name the OpenTelemetry environment gives (``OTEL_SERVICE_NAME``, or
    ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``); None if it gives none."""
    name = os.environ.get("OTEL_SERVICE_NAME", "").strip()
    if name:
        return name
    for pair in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = pair.partition("=")
        if key.strip() == "service.name" and value.strip():
            return value.strip()
    return None


_tracing_config: list[TracingConfig | None] = []


def env_tracing_config() -> TracingConfig | None:
    """Tracing from ``STREAMWISE_TRACING*`` env vars (read once); None when not enabled.

    ``STREAMWISE_TRACING=1`` turns it on; ``STREAMWISE_TRACING_SAMPLING_RATIO``,
    ``STREAMWISE_TRACING_EXPORTER`` (console, otlp, jsonl), ``STREAMWISE_TRACING_OTLP_ENDPOINT``
    and ``STREAMWISE_TRACING_DIR`` set the rest.
    """
    if not _tracing_config:
        config = None
        if os.environ.get("STREAMWISE_TRACING", "").lower() in ("1", "true", "yes", "on"):
            config = TracingConfig(
                sampling_ratio=(
                    _env_float("STREAMWISE_TRACING_SAMPLING_RATIO", 1.0)
                    if os.environ.get("STREAMWISE_TRACING_SAMPLING_RATIO", "").strip()
                    else None
                ),
                exporter=os.environ.get("STREAMWISE_TRACING_EXPORTER") or "jsonl",
                otlp_endpoint=os.environ.get("STREAMWISE_TRACING_OTLP_ENDPOINT") or None,
                jsonl_dir=os.environ.get("STREAMWISE_TRACING_DIR") or "streamwise-traces",
            )
        _tracing_config.append(config)
    return _tracing_config[0]
