"""The ``streamwise`` command line. Thin: it only calls the library.

``streamwise run pkg.module:app`` runs the bound app found at that import path until
SIGINT or SIGTERM, then drains, shuts everything down and exits 0. With
``--grpc-port`` (and ``--servicer pkg.mod:add_FooServicer_to_server``, repeatable) the
app is also served to external gRPC clients; with ``--management-port`` (and a TLS
certificate and key) the management API is served on TCP for remote operators. While
replicas start and drain, progress lines go to stderr (``_cli_progress``). ``streamwise cleanup``
deletes the shared memory of object store sessions whose processes are all gone
(a driver killed with SIGKILL, for instance). ``status``, ``scale``, ``config`` and
``shutdown`` manage running apps (``_cli_ops``). ``run --restart`` starts the driver
again if it is killed (``_cli_restart``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from streamwise import _cli_progress, _config_file
from streamwise import config as streamwise_config
from streamwise.exceptions import StreamwiseError, UsageError


def _cmd_run(args: argparse.Namespace) -> int:
    if args.restart:
        from streamwise import _cli_restart

        return _cli_restart.supervise([arg for arg in args.argv if arg != "--restart"])
    import streamwise
    from streamwise.actors import api

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    api.add_shutdown_listener(stop.set)  # `streamwise shutdown` from another shell
    api.add_replica_observer(_cli_progress.ReplicaProgress())  # progress lines on stderr
    config = None
    if args.target.endswith((".yaml", ".yml")):
        config = _config_file.load(args.target)
        apps = [(_config_file.applied(a, config.base_dir), a.name) for a in config.applications]
    else:
        apps = [(_config_file.import_app(args.target), args.name)]
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
    # The command line's options win over the file's.
    metrics_port = args.metrics_port
    metrics_host = args.metrics_host
    if config is not None:
        grpc_options = grpc_options or config.grpc_options
        tracing = tracing or config.tracing
        metrics_port = metrics_port if metrics_port is not None else config.metrics_port
        metrics_host = metrics_host or config.metrics_host
    if metrics_port is None:
        metrics_port = streamwise_config.DEFAULT_CLI_METRICS_PORT
    management = _management_options(args) or (config.management if config is not None else None)
    cluster = args.cluster or (config.cluster if config is not None else None)
    if cluster is not None and cluster != "local":
        cluster = streamwise.RayCluster(address=args.ray_address) if cluster == "ray" else cluster
    elif args.ray_address:
        raise UsageError("--ray-address needs --cluster ray")
    try:
        for app, name in apps:
            streamwise.run(
                app, name=name, grpc_options=grpc_options, tracing=tracing,
                metrics_port=None if metrics_port < 0 else metrics_port,
                metrics_host=metrics_host or streamwise_config.DEFAULT_METRICS_HOST,
                management=management, cluster=cluster,
            )
        where = f" (gRPC on {streamwise.ingress_address()})" if grpc_options else ""
        if metrics_port >= 0:
            where += f" (metrics on http://{streamwise.metrics_address()}/metrics)"
        if management is not None:
            where += (
                f" (management on {streamwise.management_address()} with TLS, token in "
                f"{streamwise.management_token_file()})"
            )
        names = ", ".join(repr(name) for _, name in apps)
        print(f"streamwise: app {names} is running{where}; Ctrl-C to stop", flush=True)
        stop.wait()
    finally:
        streamwise.shutdown()
    return 0


def _management_options(args: argparse.Namespace) -> streamwise_config.ManagementOptions | None:
    """The TCP management listener the command line asks for, if any."""
    files = (args.management_cert, args.management_key, args.management_client_ca)
    if args.management_port is None:
        if any(f is not None for f in files) or args.management_host is not None:
            raise UsageError("--management-host, --management-cert, --management-key and --management-client-ca "
                             "need --management-port")
        return None
    return streamwise_config.ManagementOptions.from_files(
        port=args.management_port,
        host=args.management_host or streamwise_config.DEFAULT_MANAGEMENT_HOST,
        ssl_certificate_file=args.management_cert,
        ssl_private_key_file=args.management_key,
        ssl_client_ca_file=args.management_client_ca,
    )


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
    # No abbreviated options: --restart must be seen for what it is (_cmd_run).
    run = commands.add_parser("run", help="run an app until SIGINT/SIGTERM", allow_abbrev=False)
    run.add_argument("target", help="import path of a bound app, MODULE:ATTRIBUTE, or a config file (.yaml)")
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
        "--metrics-port", type=int, default=None,
        help=f"serve Prometheus metrics on this port (0: any, -1: none; default: "
        f"{streamwise_config.DEFAULT_CLI_METRICS_PORT})",
    )
    run.add_argument(
        "--metrics-host", default=None,
        help=f"address the metrics endpoint binds (default: {streamwise_config.DEFAULT_METRICS_HOST})",
    )
    run.add_argument(
        "--cluster", choices=["local", "ray"], default=None,
        help="where replicas run: this machine (default, or STREAMWISE_CLUSTER), or a Ray cluster",
    )
    run.add_argument("--ray-address", default=None, help="the Ray cluster to join (default: RAY_ADDRESS, or a new one)")
    run.add_argument(
        "--restart", action="store_true",
        help="run the driver in a child process, started again if it is killed (on a Ray cluster it takes its "
        "replicas back)",
    )
    management = run.add_argument_group(
        "management over TCP", "serve the management API (status, scale, ...) to operators on other machines: "
        "TLS only, and every call needs the driver's management token"
    )
    management.add_argument("--management-port", type=int, default=None, help="listen on this port (0: any); off by default")
    management.add_argument(
        "--management-host", default=None,
        help=f"address it binds (default: {streamwise_config.DEFAULT_MANAGEMENT_HOST}; 0.0.0.0 for every interface)",
    )
    management.add_argument("--management-cert", default=None, metavar="FILE", help="the server's PEM certificate (chain)")
    management.add_argument("--management-key", default=None, metavar="FILE", help="its PEM private key")
    management.add_argument(
        "--management-client-ca", default=None, metavar="FILE",
        help="require client certificates signed by this PEM CA (mutual TLS), on top of the token",
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
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.handler(args)
    except StreamwiseError as exc:
        print(f"streamwise: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
