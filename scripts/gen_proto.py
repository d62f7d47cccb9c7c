"""Regenerate streamwise/proto/*_pb2*.py from the .proto sources.

Run from the repository root: ``python scripts/gen_proto.py`` (needs grpcio-tools,
installed by the ``test`` extra). ``--check DIR`` writes into DIR instead, for the
staleness test.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "streamwise" / "proto"


def generate(out_dir: pathlib.Path) -> None:
    """Generate Python modules for every .proto under streamwise/proto into out_dir."""
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        rel = proto.relative_to(ROOT)
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{ROOT}",
                f"-I{include}",
                f"--python_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                str(rel),
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {rel}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT)
    args = parser.parse_args()
    generate(args.out)


if __name__ == "__main__":
    sys.exit(main())
