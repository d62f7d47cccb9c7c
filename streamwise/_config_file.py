"""YAML config files: which apps to run, and options that override the code's.

::

    applications:
      - name: shop                      # default: "default"
        import_path: shop.app:app       # a bound app, MODULE:ATTRIBUTE
        deployments:                    # options of deployments of that app, by name
          - name: Model
            num_replicas: 2
            max_ongoing_requests: 16
            user_config: {threshold: 0.5}
          - name: Ranker
            autoscaling_config: {min_replicas: 0, max_replicas: 8, target_ongoing_requests: 4}
    grpc_options: {port: 9000, servicer_functions: ["chat_pb2_grpc:add_ChatServicer_to_server"]}
    metrics_port: 9464
    tracing: {exporter: jsonl, sampling_ratio: 0.1}
    cluster: ray                        # or {ray: {address: "10.0.0.1:6379"}}; default: local
    management:                         # the management API on TCP, TLS only (paths: from the file's folder)
      {port: 9500, host: 0.0.0.0, ssl_certificate_file: server.pem, ssl_private_key_file: server.key}

Every key is checked: an unknown one, a value of the wrong kind or a deployment the
app does not have is a :class:`~streamwise.exceptions.UsageError` naming the file,
the line and the key (and what would have been accepted).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Mapping
from typing import Any

import yaml

from streamwise.actors.deployment import Application, Deployment
from streamwise.config import (
    AutoscalingConfig,
    CoalesceConfig,
    DeploymentConfig,
    GrpcOptions,
    ManagementOptions,
    RayCluster,
    TracingConfig,
)
from streamwise.exceptions import UsageError

__all__ = ["AppConfig", "ServeConfig", "import_app", "load", "parse"]

_DEPLOYMENT_KEYS = {f.name for f in dataclasses.fields(DeploymentConfig)}
_GRPC_KEYS = {f.name for f in dataclasses.fields(GrpcOptions)}
_TRACING_KEYS = {f.name for f in dataclasses.fields(TracingConfig)}
# A custom policy is a function: it is set in code, not in a file.
_AUTOSCALING_KEYS = {f.name for f in dataclasses.fields(AutoscalingConfig)} - {"policy"}
_NESTED = {"coalesce": (CoalesceConfig, {f.name for f in dataclasses.fields(CoalesceConfig)}),
           "autoscaling_config": (AutoscalingConfig, _AUTOSCALING_KEYS)}
_MANAGEMENT_KEYS = {"port", "host", "ssl_certificate_file", "ssl_private_key_file", "ssl_client_ca_file"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AppConfig:
    """One application of a config file."""

    name: str
    import_path: str
    deployments: Mapping[str, Mapping[str, Any]]  # deployment name -> options to set
    where: Mapping[str, str]  # deployment name -> "file:line", for errors found later


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """A whole config file."""

    applications: tuple[AppConfig, ...]
    grpc_options: GrpcOptions | None = None
    metrics_port: int | None = None
    metrics_host: str | None = None
    tracing: TracingConfig | None = None
    management: ManagementOptions | None = None
    cluster: RayCluster | str | None = None  # "local", or a RayCluster
    base_dir: str = "."  # import paths are found from here (the file's directory)


class _Reader:
    """Walks the YAML nodes beside their values, so every error can say where."""

    def __init__(self, filename: str) -> None:
        self.filename = filename

    def fail(self, node: yaml.Node, message: str) -> UsageError:
        return UsageError(f"{self.filename}:{node.start_mark.line + 1}: {message}")

    def mapping(self, node: yaml.Node, what: str, known: set[str]) -> dict[str, tuple[yaml.Node, Any]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        out: dict[str, tuple[yaml.Node, Any]] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key not in known:
                raise self.fail(key_node, f"unknown key {key!r} in {what} (known: {', '.join(sorted(known))})")
            if key in out:
                raise self.fail(key_node, f"{key!r} is given twice in {what}")
            out[key] = (value_node, _value(value_node))  # the value's node: errors point at its line
        return out

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        return list(node.value)

    def build(self, node: yaml.Node, what: str, make: Any, fields: dict[str, tuple[yaml.Node, Any]]) -> Any:
        try:
            return make(**{key: value for key, (_, value) in fields.items()})
        except (UsageError, TypeError, ValueError) as exc:
            # Point at the key the error names, when it names one.
            at = next((key_node for key, (key_node, _) in fields.items() if key != "name" and key in str(exc)), node)
            raise self.fail(at, f"{what}: {exc}") from None


def _value(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_document(node)  # type: ignore[no-untyped-call]


def parse(text: str, filename: str = "<config>") -> ServeConfig:
    """The config in ``text`` (``filename`` names it in errors)."""
    reader = _Reader(filename)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise UsageError(f"{filename}: not valid YAML: {exc}") from None
    if root is None:
        raise UsageError(f"{filename}: the file is empty; it needs an 'applications' list")
    top = reader.mapping(
        root, "the config",
        {"applications", "grpc_options", "metrics_port", "metrics_host", "tracing", "management", "cluster"},
    )
    base_dir = os.path.dirname(os.path.abspath(filename)) if filename != "<config>" else os.getcwd()
    if "applications" not in top:
        raise reader.fail(root, "the config needs an 'applications' list")
    apps = tuple(_application(reader, node) for node in reader.sequence(top["applications"][0], "applications"))
    names = [app.name for app in apps]
    if len(set(names)) != len(names):
        raise reader.fail(top["applications"][0], f"application names must differ, got {names}")
    grpc_options = None
    if "grpc_options" in top:
        node = top["grpc_options"][0]
        grpc_options = reader.build(node, "grpc_options", GrpcOptions, reader.mapping(node, "grpc_options", _GRPC_KEYS))
    tracing = None
    if "tracing" in top:
        node = top["tracing"][0]
        tracing = reader.build(node, "tracing", TracingConfig, reader.mapping(node, "tracing", _TRACING_KEYS))
    metrics_port = top["metrics_port"][1] if "metrics_port" in top else None
    if metrics_port is not None and not (isinstance(metrics_port, int) and 0 <= metrics_port < 65536):
        raise reader.fail(top["metrics_port"][0], f"metrics_port must be a port number, got {metrics_port!r}")
    metrics_host = top["metrics_host"][1] if "metrics_host" in top else None
    cluster = None
    if "cluster" in top:
        node, value = top["cluster"]
        if value in ("local", "ray"):
            cluster = value if value == "local" else RayCluster()
        elif isinstance(node, yaml.MappingNode):
            fields = reader.mapping(node, "cluster", {"ray"})
            if "ray" not in fields:
                raise reader.fail(node, "cluster needs a 'ray' key")
            ray_node = fields["ray"][0]
            cluster = reader.build(ray_node, "cluster.ray", RayCluster,
                                   reader.mapping(ray_node, "cluster.ray", {"address", "namespace"}))
        else:
            raise reader.fail(node, f"cluster must be local, ray or {{ray: {{address: ..., namespace: ...}}}}, got {value!r}")
    management = None
    if "management" in top:
        node = top["management"][0]
        fields = reader.mapping(node, "management", _MANAGEMENT_KEYS)
        for key, (value_node, value) in fields.items():
            if key.endswith("_file") and isinstance(value, str):
                fields[key] = (value_node, os.path.join(base_dir, value))
        management = reader.build(node, "management", ManagementOptions.from_files, fields)
    return ServeConfig(
        applications=apps,
        grpc_options=grpc_options,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        tracing=tracing,
        management=management,
        cluster=cluster,
        base_dir=base_dir,
    )


def _application(reader: _Reader, node: yaml.Node) -> AppConfig:
    fields = reader.mapping(node, "an application", {"name", "import_path", "deployments"})
    name = fields.get("name", (node, "default"))[1]
    if not isinstance(name, str) or not name:
        raise reader.fail(fields["name"][0], f"an application's name must be a non-empty string, got {name!r}")
    if "import_path" not in fields:
        raise reader.fail(node, f"application {name!r} needs an import_path (MODULE:ATTRIBUTE)")
    import_path = fields["import_path"][1]
    if not isinstance(import_path, str) or ":" not in import_path:
        raise reader.fail(fields["import_path"][0], f"import_path must be MODULE:ATTRIBUTE, got {import_path!r}")
    deployments: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    if "deployments" in fields:
        for dep_node in reader.sequence(fields["deployments"][0], f"deployments of {name!r}"):
            options = reader.mapping(dep_node, f"a deployment of {name!r}", _DEPLOYMENT_KEYS)
            if "name" not in options:
                raise reader.fail(dep_node, f"a deployment of {name!r} needs a name")
            dep_name = options.pop("name")[1]
            for key, (make, known) in _NESTED.items():
                if key in options and options[key][1] is not None:
                    nested_node = options[key][0]
                    nested = reader.build(nested_node, key, make, reader.mapping(nested_node, key, known))
                    options[key] = (nested_node, nested)
            # Checked now, against defaults: the values must at least make sense alone.
            reader.build(dep_node, f"deployment {dep_name!r}", DeploymentConfig, {"name": (dep_node, dep_name), **options})
            deployments[dep_name] = {key: value for key, (_, value) in options.items()}
            where[dep_name] = f"{reader.filename}:{dep_node.start_mark.line + 1}"
    return AppConfig(name=name, import_path=import_path, deployments=deployments, where=where)


def load(path: str) -> ServeConfig:
    """The config file at ``path``."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    return parse(text, path)


def import_app(path: str, base_dir: str | None = None) -> Application:
    """The bound app at the import path ``MODULE:ATTRIBUTE`` (``base_dir`` first on sys.path)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected MODULE:ATTRIBUTE, got {path!r}")
    directory = base_dir or os.getcwd()
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from None


def applied(config: AppConfig, base_dir: str) -> Application:
    """The app ``config`` names, with the file's options in place of the code's."""
    root = import_app(config.import_path, base_dir)
    if not isinstance(root, Application):
        raise UsageError(f"{config.import_path} is not a bound app (Deployment.bind(...)), but {root!r}")
    seen: set[str] = set()
    rebuilt: dict[int, Application] = {}

    def visit(node: Application) -> Application:
        if id(node) in rebuilt:
            return rebuilt[id(node)]
        dep: Deployment = node.deployment
        seen.add(dep.name)
        changes = config.deployments.get(dep.name)
        if changes:
            try:
                dep = dep.options(**changes)
            except UsageError as exc:
                raise UsageError(f"{config.where[dep.name]}: {exc}") from None
        out = Application(dep, tuple(convert(a) for a in node.args), {k: convert(v) for k, v in node.kwargs.items()})
        rebuilt[id(node)] = out
        return out

    def convert(value: Any) -> Any:
        if isinstance(value, Application):
            return visit(value)
        if isinstance(value, (list, tuple)):
            return type(value)(convert(v) for v in value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    app = visit(root)
    for name in config.deployments:
        if name not in seen:
            raise UsageError(
                f"{config.where[name]}: application {config.name!r} ({config.import_path}) has no deployment "
                f"{name!r}; it has: {', '.join(sorted(seen))}"
            )
    return app
