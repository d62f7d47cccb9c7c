"""The ``streamwise`` command line. Thin: it only calls the library.

``streamwise run pkg.module:app`` runs the bound app found at that import path until
SIGINT or SIGTERM, then drains, shuts everything down and exits 0. With
``--grpc-port`` (and ``--servicer pkg.mod:add_FooServicer_to_server``, repeatable) the
app is also served to external gRPC clients. ``streamwise cleanup``
deletes the shared memory of object store sessions whose processes are all gone
(a driver killed with SIGKILL, for instance). ``status``, ``scale``, ``config`` and
``shutdown`` manage running apps (``_cli_ops``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from streamwise import config as streamwise_config
from streamwise.exceptions import StreamwiseError, UsageError


def _import_app(path: str):
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected MODULE:ATTRIBUTE, got {path!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from None


def _cmd_run(args: argparse.Namespace) -> int:
    import streamwise
    from streamwise.actors import api

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    api.add_shutdown_listener(stop.set)  # `streamwise shutdown` from another shell
    app = _import_app(args.target)
    grpc_options = None
    if args.grpc_port is not None or args.servicer:
        grpc_options = streamwise.GrpcOptions(
            port=args.grpc_port if args.grpc_port is not None else streamwise.config.DEFAULT_GRPC_PORT,
            host=args.grpc_host,
            servicer_functions=args.servicer,
        )
    tracing = None
    if args.tracing:
        tracing = streamwise.TracingConfig(
            exporter=args.tracing_exporter,
            jsonl_dir=args.tracing_dir,
            otlp_endpoint=args.tracing_endpoint,
            sampling_ratio=args.tracing_sampling_ratio,
        )
    try:
        metrics_port = None if args.metrics_port < 0 else args.metrics_port
        streamwise.run(
            app, name=args.name, grpc_options=grpc_options, tracing=tracing,
            metrics_port=metrics_port, metrics_host=args.metrics_host,
        )
        where = f" (gRPC on {streamwise.ingress_address()})" if grpc_options else ""
        if metrics_port is not None:
            where += f" (metrics on http://{streamwise.metrics_address()}/metrics)"
        print(f"streamwise: app {args.name!r} is running{where}; Ctrl-C to stop", flush=True)
        stop.wait()
    finally:
        streamwise.shutdown()
    return 0


def _cmd_trace_view(args: argparse.Namespace) -> int:
    from streamwise.tracing import viewer

    grouped = viewer.traces(viewer.load(args.path), args.trace_id, args.min_duration_ms)
    print(viewer.waterfall(grouped) if grouped else "no traces match")
    return 0


def _cmd_trace_export(args: argparse.Namespace) -> int:
    import orjson

    from streamwise.tracing import viewer

    grouped = viewer.traces(viewer.load(args.path), args.trace_id, args.min_duration_ms)
    with open(args.output, "wb") as out:
        out.write(orjson.dumps(viewer.chrome_trace(grouped)))
    print(f"wrote {sum(len(v) for v in grouped.values())} spans of {len(grouped)} traces to {args.output}")
    return 0


def _trace_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a .jsonl trace export, or a directory of them")
    parser.add_argument("--trace-id", default=None, help="only the trace whose id starts with this")
    parser.add_argument("--min-duration-ms", type=float, default=0.0, help="only traces at least this long")


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from streamwise import _auth, objectstore

    removed = objectstore.cleanup_stale()
    print(f"streamwise: removed {len(removed)} stale object store session(s)", *removed, sep="\n  ")
    run_dirs = _auth.sweep_stale_run_dirs()
    print(f"streamwise: removed {len(run_dirs)} stale run directory(ies)", *run_dirs, sep="\n  ")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamwise", description="Serve Python code as streaming actors.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run an app until SIGINT/SIGTERM")
    run.add_argument("target", help="import path of a bound app, MODULE:ATTRIBUTE")
    run.add_argument("--name", default="default", help="application name (default: %(default)s)")
    run.add_argument("--grpc-port", type=int, default=None, help="serve the app over gRPC on this port (0: any)")
    run.add_argument("--grpc-host", default="0.0.0.0", help="address the gRPC ingress binds (default: %(default)s)")
    run.add_argument(
        "--servicer",
        action="append",
        default=[],
        metavar="MODULE:add_XServicer_to_server",
        help="a generated servicer function whose RPCs the app serves (repeatable)",
    )
    run.add_argument("--tracing", action="store_true", help="record OpenTelemetry traces")
    run.add_argument("--tracing-exporter", default="jsonl", choices=["jsonl", "otlp", "console"])
    run.add_argument("--tracing-dir", default="streamwise-traces", help="where jsonl traces go")
    run.add_argument(
        "--tracing-endpoint", default=None, help="OTLP/gRPC collector address (default: OTEL_EXPORTER_OTLP_ENDPOINT)"
    )
    run.add_argument(
        "--tracing-sampling-ratio", type=float, default=None, help="default: OTEL_TRACES_SAMPLER(_ARG), else 1.0"
    )
    run.add_argument(
        "--metrics-port", type=int, default=streamwise_config.DEFAULT_CLI_METRICS_PORT,
        help="serve Prometheus metrics on this port (0: any, -1: none; default: %(default)s)",
    )
    run.add_argument(
        "--metrics-host", default=streamwise_config.DEFAULT_METRICS_HOST,
        help="address the metrics endpoint binds (default: %(default)s)",
    )
    run.set_defaults(handler=_cmd_run)

    trace = commands.add_parser("trace", help="read trace exports").add_subparsers(dest="trace_command", required=True)
    view = trace.add_parser("view", help="print each trace as an indented waterfall")
    _trace_filters(view)
    view.set_defaults(handler=_cmd_trace_view)
    export = trace.add_parser("export", help="write Chrome trace-event JSON (Perfetto, chrome://tracing)")
    _trace_filters(export)
    export.add_argument("--format", choices=["chrome"], default="chrome")
    export.add_argument("-o", "--output", required=True)
    export.set_defaults(handler=_cmd_trace_export)
    cleanup = commands.add_parser("cleanup", help="delete shared memory and run directories left by killed streamwise processes")
    cleanup.set_defaults(handler=_cmd_cleanup)
    from streamwise import _cli_ops

    _cli_ops.add_commands(commands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except StreamwiseError as exc:
        print(f"streamwise: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
