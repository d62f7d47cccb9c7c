"""The ``streamwise`` command line. Thin: it only calls the library.

``streamwise run pkg.module:app`` runs the bound app found at that import path until
SIGINT or SIGTERM, then shuts everything down and exits 0. ``streamwise cleanup``
deletes the shared memory of object store sessions whose processes are all gone
(a driver killed with SIGKILL, for instance).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

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

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    app = _import_app(args.target)
    try:
        streamwise.run(app, name=args.name)
        print(f"streamwise: app {args.name!r} is running; Ctrl-C to stop", flush=True)
        stop.wait()
    finally:
        streamwise.shutdown()
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from streamwise import objectstore

    removed = objectstore.cleanup_stale()
    print(f"streamwise: removed {len(removed)} stale object store session(s)", *removed, sep="\n  ")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamwise", description="Serve Python code as streaming actors.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run an app until SIGINT/SIGTERM")
    run.add_argument("target", help="import path of a bound app, MODULE:ATTRIBUTE")
    run.add_argument("--name", default="default", help="application name (default: %(default)s)")
    run.set_defaults(handler=_cmd_run)
    cleanup = commands.add_parser("cleanup", help="delete shared memory left by killed streamwise processes")
    cleanup.set_defaults(handler=_cmd_cleanup)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except StreamwiseError as exc:
        print(f"streamwise: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
