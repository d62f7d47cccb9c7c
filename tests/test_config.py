import json
import os
import subprocess
import sys

import pytest

import streamwise
from streamwise.exceptions import UsageError


def test_decorator_validates_when_applied():
    """Bad knobs fail when @deployment is applied, naming the deployment and knob."""
    with pytest.raises(UsageError, match="num_replicas of 'Bad'"):

        @streamwise.deployment(num_replicas=0)
        class Bad:
            pass

    with pytest.raises(UsageError, match="max_ongoing_requests"):
        streamwise.deployment(max_ongoing_requests=-1)(type("Bad2", (), {}))
    with pytest.raises(UsageError, match="invalid @deployment option"):
        streamwise.deployment(no_such_option=1)(type("Bad3", (), {}))


def test_options_returns_changed_copy():
    """Deployment.options() returns a new deployment; the original is unchanged."""

    @streamwise.deployment(num_replicas=1)
    class A:
        async def __call__(self):
            return 1

    B = A.options(num_replicas=3, name="B")
    assert (A.name, A.config.num_replicas) == ("A", 1)
    assert (B.name, B.config.num_replicas) == ("B", 3)
    with pytest.raises(UsageError):
        A.options(num_replicas=0)


def test_default_max_ongoing_requests_is_5():
    """The default concurrency limit per replica is 5."""

    @streamwise.deployment
    class A:
        pass

    assert A.config.max_ongoing_requests == 5


def test_router_backoff_from_environment():
    """STREAMWISE_ROUTER_RETRY_* env vars set the router's backoff (read once)."""
    code = (
        "import json; from streamwise.config import env_router_config as e; c = e();"
        "print(json.dumps([c.initial_backoff_s, c.backoff_multiplier, c.max_backoff_s]))"
    )
    env = dict(
        os.environ,
        STREAMWISE_ROUTER_RETRY_INITIAL_BACKOFF_S="0.1",
        STREAMWISE_ROUTER_RETRY_BACKOFF_MULTIPLIER="3",
        STREAMWISE_ROUTER_RETRY_MAX_BACKOFF_S="2",
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [0.1, 3.0, 2.0]


def test_backoff_sequence():
    """Backoffs start at initial, multiply, and cap at max."""
    c = streamwise.RouterConfig(initial_backoff_s=0.025, backoff_multiplier=2, max_backoff_s=0.1)
    gen = c.backoffs()
    assert [next(gen) for _ in range(5)] == [0.025, 0.05, 0.1, 0.1, 0.1]


def test_transport_from_environment():
    """STREAMWISE_* transport env vars set the handle default, threshold, limits and capacity."""
    code = (
        "import json; from streamwise.config import env_transport_config as e; c = e();"
        "print(json.dumps([c.by_reference, c.by_reference_threshold_bytes, c.grpc_max_message_length,"
        " c.object_store_memory]))"
    )
    env = dict(
        os.environ,
        STREAMWISE_USE_GRPC_BY_DEFAULT="1",
        STREAMWISE_BY_REFERENCE_THRESHOLD_BYTES="2048",
        STREAMWISE_GRPC_MAX_MESSAGE_LENGTH="1000000",
        STREAMWISE_OBJECT_STORE_MEMORY="123456789",
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [False, 2048, 1000000, 123456789]


def test_transport_defaults_and_validation():
    """By reference above 100 KiB and a 4 MiB inline limit by default; bad values fail early."""
    c = streamwise.TransportConfig()
    assert (c.by_reference, c.by_reference_threshold_bytes, c.grpc_max_message_length) == (True, 102400, 4194304)
    with pytest.raises(UsageError, match="grpc_max_message_length"):
        streamwise.TransportConfig(grpc_max_message_length=0)
    with pytest.raises(UsageError, match="by_reference"):
        streamwise.HandleOptions(by_reference="yes")


def test_ray_cluster_grace_must_be_a_finite_number_of_seconds():
    """controller_grace_s is how long replicas serve on without their driver: 0 or
    more, and finite (a replica must stop some time after its driver is gone)."""
    assert streamwise.RayCluster().controller_grace_s == 60.0
    assert streamwise.RayCluster(controller_grace_s=0).controller_grace_s == 0
    for bad in (-1, float("inf"), float("nan"), "60"):
        with pytest.raises(UsageError, match="controller_grace_s"):
            streamwise.RayCluster(controller_grace_s=bad)
