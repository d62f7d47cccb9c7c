"""The operator's commands of the CLI: ``status``, ``scale``, ``config``, ``logs``, ``shutdown``.

Each finds this user's running drivers through their run directories and calls the
management API (``proto/management.proto``) of the one that runs the application
named, or of every driver when none is named. With ``--address HOST:PORT`` (or
``STREAMWISE_MANAGEMENT_ADDRESS``) they call the one driver listening there instead,
over TLS, with a copy of its token (``--token-file``); ``logs`` reads the replicas'
log files, so it runs on the driver's machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import json_format

from streamwise import _config_file
from streamwise.actors import _logs
from streamwise.actors.management import Driver, remote_driver, running_drivers
from streamwise.config import env_management_client
from streamwise.exceptions import UsageError
from streamwise.proto import management_pb2, management_pb2_grpc

_TIMEOUT_S = 30.0


def _stub(driver: Driver) -> tuple[grpc.Channel, management_pb2_grpc.ManagementStub]:
    channel = driver.channel()
    return channel, management_pb2_grpc.ManagementStub(channel)


def _remote(args: argparse.Namespace) -> Driver | None:
    """The remote driver the options (or the environment) name; None for local ones."""
    env = env_management_client()
    address = args.address or env["address"]
    if address is None:
        return None
    token_file = args.token_file or env["token_file"]
    if token_file is None:
        raise UsageError(
            "--address needs --token-file (or STREAMWISE_MANAGEMENT_TOKEN_FILE): a copy of the driver's "
            "management.token, whose path `streamwise run` prints"
        )
    return remote_driver(
        address,
        token_file=token_file,
        ca_cert_file=args.ca_cert or env["ca_cert"],
        cert_file=args.cert or env["cert"],
        key_file=args.key or env["key"],
    )


def _drivers(args: argparse.Namespace) -> list[Driver]:
    remote = _remote(args)
    return [remote] if remote is not None else running_drivers()


def _call(driver: Driver, method: str, request: Any, **kwargs: Any) -> Any:
    channel, stub = _stub(driver)
    with channel:
        try:
            return getattr(stub, method)(request, metadata=driver.metadata(), timeout=_TIMEOUT_S, **kwargs)
        except grpc.RpcError as exc:
            raise UsageError(f"{method}: {exc.details() or exc.code().name}") from None


def _as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _listed(driver: Driver) -> list[management_pb2.ApplicationStatus]:
    """The driver's applications; none if it does not answer (it is stopping)."""
    try:
        return list(_call(driver, "ListApplications", management_pb2.ListApplicationsRequest()).applications)
    except UsageError:
        return []


def _applications(args: argparse.Namespace) -> Iterator[tuple[Driver, management_pb2.ApplicationStatus]]:
    """(driver, described application) of every app running, or only ``args.application``."""
    found = False
    for driver in _drivers(args):
        for app in _listed(driver):
            if args.application in (None, app.name):
                found = True
                request = management_pb2.DescribeApplicationRequest(application=app.name)
                yield driver, _call(driver, "DescribeApplication", request)
    if args.application is not None and not found:
        raise UsageError(f"no application {args.application!r} is running")


def _driver_of(args: argparse.Namespace) -> Driver:
    application = args.application
    for driver in _drivers(args):
        if any(app.name == application for app in _listed(driver)):
            return driver
    raise UsageError(f"no application {application!r} is running")


def _uptime(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def cmd_status(args: argparse.Namespace) -> int:
    described = list(_applications(args))
    if args.json:
        apps = []
        for driver, app in described:
            entry = _as_dict(app)
            entry["driver_pid"] = driver.pid
            entry["ingress"] = driver.ingress
            for dep in entry["deployments"]:
                dep["config"] = json.loads(dep.pop("config_json") or "{}")
            apps.append(entry)
        print(json.dumps({"applications": apps}, indent=2))
        return 0
    if not described:
        print("no applications are running")
        return 0
    rows = [("APPLICATION", "DEPLOYMENT", "REPLICA", "STATE", "PID", "UPTIME", "ONGOING")]
    for _, app in described:
        for dep in app.deployments:
            for r in dep.replicas:
                ongoing = "?" if r.ongoing_requests < 0 else str(r.ongoing_requests)
                rows.append((app.name, dep.name, r.replica_id, r.state, str(r.pid), _uptime(r.uptime_s), ongoing))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for driver, app in described:
        where = f", gRPC on {driver.ingress}" if driver.ingress else ""
        deps = ", ".join(
            f"{d.name} {d.running_replicas}/{d.target_replicas} {d.status}"
            + (f" (autoscaling {d.autoscaling.min_replicas}-{d.autoscaling.max_replicas})"
               if d.HasField("autoscaling") else "")
            + (f" ({d.restarts} restarts)" if d.restarts else "")
            for d in app.deployments
        )
        print(f"{app.name}: {app.status} (driver pid {driver.pid}{where}) - {deps}")
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _progress(status: management_pb2.DeploymentStatus) -> str:
    states: dict[str, int] = {}
    for replica in status.replicas:
        states[replica.state] = states.get(replica.state, 0) + 1
    others = ", ".join(f"{n} {state.lower()}" for state, n in sorted(states.items()) if state != "RUNNING")
    line = f"{status.name}: {status.running_replicas}/{status.target_replicas} running" + (f" ({others})" if others else "")
    if status.HasField("autoscaling"):
        line += f" [autoscaling {status.autoscaling.min_replicas}-{status.autoscaling.max_replicas}]"
    return line


def _scale_request(args: argparse.Namespace) -> management_pb2.ScaleDeploymentRequest:
    bounds = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas}
    bounds = {key: value for key, value in bounds.items() if value is not None}
    if (args.num_replicas is None) == (not bounds):
        raise UsageError("give either a number of replicas, or autoscaling bounds (--min and/or --max)")
    if args.num_replicas is not None and args.num_replicas < 1:
        raise UsageError(
            f"the number of replicas must be >= 1, got {args.num_replicas} (to scale to zero: --min 0)"
        )
    if any(value < 0 for value in bounds.values()):
        raise UsageError(f"autoscaling bounds must be >= 0, got {bounds}")
    return management_pb2.ScaleDeploymentRequest(
        application=args.application, deployment=args.deployment, num_replicas=args.num_replicas or 0, **bounds
    )


def cmd_scale(args: argparse.Namespace) -> int:
    request = _scale_request(args)
    driver = _driver_of(args)
    channel, stub = _stub(driver)
    last = ""
    with channel:
        try:
            for status in stub.ScaleDeployment(request, metadata=driver.metadata()):
                line = _progress(status)
                if line != last:
                    print(line, flush=True)
                    last = line
        except grpc.RpcError as exc:
            raise UsageError(f"scale: {exc.details() or exc.code().name}") from None
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    driver = _driver_of(args)
    app = _call(driver, "DescribeApplication", management_pb2.DescribeApplicationRequest(application=args.application))
    configs = {dep.name: json.loads(dep.config_json or "{}") for dep in app.deployments}
    print(json.dumps({"name": app.name, "root_deployment": app.root_deployment, "deployments": configs}, indent=2))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    if args.address or env_management_client()["address"]:
        raise UsageError(
            "logs needs the local run dir: it reads the replicas' log files, so run `streamwise logs` on the "
            "driver's machine (without --address)"
        )
    driver = _driver_of(args)
    shown = 0
    for replica, text in _logs.read(driver.run_dir, args.application, args.deployment):
        shown += 1
        for line in text.splitlines():
            print(f"({replica}) {line}")
    if not shown:
        what = f"deployment {args.deployment!r} of " if args.deployment else ""
        print(f"streamwise: no output yet from {what}application {args.application!r}", file=sys.stderr)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    _config_file.load(args.config)  # a bad file is refused here, before any driver is asked
    with open(args.config) as f:
        text = f.read()
    drivers = _drivers(args)
    if len(drivers) > 1 and args.pid is None:
        pids = ", ".join(str(d.pid) for d in drivers)
        raise UsageError(f"several drivers run ({pids}); choose one with --pid")
    driver = next((d for d in drivers if args.pid in (None, d.pid)), None)
    if driver is None:
        raise UsageError(f"no streamwise driver with pid {args.pid} is running")
    request = management_pb2.DeployRequest(config_yaml=text, filename=os.path.abspath(args.config))
    print(f"streamwise: deploying {args.config} to driver {driver.pid}...", file=sys.stderr, flush=True)
    channel, stub = _stub(driver)
    with channel:
        try:
            reply = stub.Deploy(request, metadata=driver.metadata())
        except grpc.RpcError as exc:
            raise UsageError(f"deploy: {exc.details() or exc.code().name}") from None
    for app in reply.applications:
        deps = ", ".join(f"{d.name} {d.running_replicas}/{d.target_replicas}" for d in app.deployments)
        print(f"{app.name}: {app.status} - {deps}")
    return 0


def cmd_shutdown(args: argparse.Namespace) -> int:
    drivers = _drivers(args) if args.application is None else [_driver_of(args)]
    for driver in drivers:
        _call(driver, "Shutdown", management_pb2.ShutdownRequest())
        print(f"streamwise: driver {driver.pid} shut its applications down", file=sys.stderr)
    return 0


def _remote_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    remote = options.add_argument_group(
        "a remote driver", "reach the driver whose management API listens on HOST:PORT (streamwise run "
        "--management-port), over TLS; each option's default is the environment variable named"
    )
    remote.add_argument("--address", default=None, metavar="HOST:PORT", help="STREAMWISE_MANAGEMENT_ADDRESS")
    remote.add_argument(
        "--ca-cert", default=None, metavar="FILE",
        help="PEM CA that signed the driver's certificate (default: system roots); STREAMWISE_MANAGEMENT_CA_CERT",
    )
    remote.add_argument(
        "--token-file", default=None, metavar="FILE",
        help="a copy of the driver's management.token; STREAMWISE_MANAGEMENT_TOKEN_FILE",
    )
    remote.add_argument(
        "--cert", default=None, metavar="FILE",
        help="this client's PEM certificate, for a driver that requires one; STREAMWISE_MANAGEMENT_CERT",
    )
    remote.add_argument("--key", default=None, metavar="FILE", help="its private key; STREAMWISE_MANAGEMENT_KEY")
    return options


def add_commands(commands: Any) -> None:
    """Register the operator's commands on the CLI's subparsers."""
    remote = [_remote_options()]
    status = commands.add_parser("status", parents=remote, help="show the running applications, deployments and replicas")
    status.add_argument("application", nargs="?", default=None, help="only this application")
    status.add_argument("--json", action="store_true", help="print JSON: applications -> deployments -> replicas")
    status.set_defaults(handler=cmd_status)
    scale = commands.add_parser(
        "scale",
        parents=remote,
        help="set a deployment's number of replicas (draining the ones that go), or its autoscaling bounds",
    )
    scale.add_argument("application")
    scale.add_argument("deployment")
    scale.add_argument("num_replicas", type=int, nargs="?", default=None, help="a fixed count: autoscaling off")
    scale.add_argument("--min", dest="min_replicas", type=int, default=None, help="autoscale, at least this many")
    scale.add_argument("--max", dest="max_replicas", type=int, default=None, help="autoscale, at most this many")
    scale.set_defaults(handler=cmd_scale)
    config = commands.add_parser("config", parents=remote, help="print the options each deployment of an application runs with")
    config.add_argument("application")
    config.set_defaults(handler=cmd_config)
    deploy = commands.add_parser("deploy", parents=remote, help="run the applications of a config file on the running driver")
    deploy.add_argument("config", help="a YAML config file (see `streamwise run FILE`); import paths are found on the driver's machine")
    deploy.add_argument("--pid", type=int, default=None, help="the driver to deploy to, when several run")
    deploy.set_defaults(handler=cmd_deploy)
    logs = commands.add_parser("logs", parents=remote, help="print what an application's replicas wrote to stdout and stderr (on the driver's machine)")
    logs.add_argument("application")
    logs.add_argument("deployment", nargs="?", default=None, help="only this deployment's replicas")
    logs.set_defaults(handler=cmd_logs)
    shutdown = commands.add_parser("shutdown", parents=remote, help="drain and stop the running applications")
    shutdown.add_argument("application", nargs="?", default=None, help="only the driver running this application")
    shutdown.set_defaults(handler=cmd_shutdown)
