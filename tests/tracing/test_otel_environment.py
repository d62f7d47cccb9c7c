"""The standard OTEL_* environment variables work as for any OpenTelemetry program.

Each case runs a driver in a process of its own, whose environment (and so its
replicas') carries the variables, against a real OTLP/gRPC receiver.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import streamwise

_DRIVER = textwrap.dedent(
    """
    import streamwise

    @streamwise.deployment
    class Shop:
        async def __call__(self, item):
            return item * 2

    handle = streamwise.run(Shop.bind(), tracing=streamwise.TracingConfig(exporter="otlp"))
    assert handle.remote(21).result() == 42
    streamwise.shutdown()  # flushes every process's spans
    """
)


def _run_driver(env: dict[str, str]) -> None:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STREAMWISE_TRACING"))}
    out = subprocess.run(
        [sys.executable, "-c", _DRIVER], env={**full, **env}, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


def test_endpoint_service_name_and_resource_come_from_the_environment(otlp_receiver):
    """OTEL_EXPORTER_OTLP_ENDPOINT (an http:// URL: no TLS) takes the spans of the
    driver and its replica; OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name them."""
    _run_driver(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_receiver.port}",
            "OTEL_SERVICE_NAME": "shop-service",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test,team=search",
        }
    )
    names = {span.name for _, span in otlp_receiver.spans}
    assert {"route Shop.__call__", "Shop.__call__"} <= names
    assert {service for service, _ in otlp_receiver.spans} == {"shop-service"}
    deployments = {r.get("streamwise.deployment") for r in otlp_receiver.resources}
    assert "Shop" in deployments  # the replica's own attributes are still there
    assert all(r["deployment.environment"] == "test" and r["team"] == "search" for r in otlp_receiver.resources)


def test_a_collector_over_tls_with_the_standard_certificate_variable(tls_otlp_receiver, tls_files):
    """An https:// endpoint is reached with TLS, trusting OTEL_EXPORTER_OTLP_CERTIFICATE:
    the spans of the driver and its replica arrive at a TLS-only collector."""
    _run_driver(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"https://localhost:{tls_otlp_receiver.port}",
            "OTEL_EXPORTER_OTLP_CERTIFICATE": str(tls_files.ca),
        }
    )
    names = {span.name for _, span in tls_otlp_receiver.spans}
    assert {"route Shop.__call__", "Shop.__call__"} <= names


def test_the_traces_endpoint_wins_over_the_general_one(otlp_receiver):
    """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is used over OTEL_EXPORTER_OTLP_ENDPOINT."""
    _run_driver(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",  # nothing listens there
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{otlp_receiver.port}",
        }
    )
    assert any(span.name == "Shop.__call__" for _, span in otlp_receiver.spans)


def test_the_sampler_variables_set_the_ratio(otlp_receiver):
    """OTEL_TRACES_SAMPLER=always_off samples nothing: no span is exported."""
    _run_driver(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_receiver.port}",
            "OTEL_TRACES_SAMPLER": "always_off",
        }
    )
    assert otlp_receiver.spans == []


@pytest.mark.parametrize(
    "env,ratio",
    [
        ({}, 1.0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}, 0.25),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, 0.0),
    ],
)
def test_an_explicit_ratio_wins_over_the_environment(monkeypatch, env, ratio):
    """TracingConfig takes its ratio from OTEL_TRACES_SAMPLER(_ARG) unless given one."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert streamwise.TracingConfig().sampling_ratio == ratio
    assert streamwise.TracingConfig(sampling_ratio=0.5).sampling_ratio == 0.5


def test_an_unsupported_sampler_is_refused_by_name(monkeypatch):
    """A sampler streamwise cannot honour is refused, naming the variable."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "jaeger_remote")
    with pytest.raises(streamwise.exceptions.UsageError, match="OTEL_TRACES_SAMPLER"):
        streamwise.TracingConfig()
