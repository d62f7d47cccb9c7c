"""Generates client and server code from tests/streaming/protos/*.proto for the tests.

The code is generated once per session into a temporary directory put on sys.path;
replica processes inherit sys.path, so they import the same modules.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

PROTOS = pathlib.Path(__file__).parent / "protos"
_generated: list[str] = []


def pytest_configure(config) -> None:
    out = tempfile.mkdtemp(prefix="streamwise-test-protos-")
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    for proto in sorted(PROTOS.glob("*.proto")):
        code = protoc.main(
            ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", str(proto)]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    sys.path.insert(0, out)
    _generated.append(out)


def pytest_unconfigure(config) -> None:
    for out in _generated:
        if out in sys.path:
            sys.path.remove(out)
        shutil.rmtree(out, ignore_errors=True)
