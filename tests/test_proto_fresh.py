import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The generators stamp their own release into the code (the runtime versions it
# requires): a new patch release of grpcio-tools changes only these lines, and the
# committed stamps are the older, more permissive ones. Compare everything else.
_STAMPS = (
    re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M),
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"^(_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:\s+.*\n)*?\))", re.M),
)


def _without_stamps(text: str) -> str:
    for stamp in _STAMPS:
        text = stamp.sub("<version stamp>", text)
    return text


def test_version_stamps_are_recognised():
    """The stamps masked below are really there: otherwise the comparison would
    hide nothing and a format change of the generators would go unnoticed."""
    grpc_code = (ROOT / "streamwise" / "proto" / "replica_pb2_grpc.py").read_text()
    pb2_code = (ROOT / "streamwise" / "proto" / "replica_pb2.py").read_text()
    assert _without_stamps(grpc_code).count("<version stamp>") == 1
    assert _without_stamps(pb2_code).count("<version stamp>") == 2


def test_generated_code_matches_proto_sources(tmp_path):
    """The committed *_pb2*.py files are what the .proto sources generate today."""
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
    )
    generated = sorted((tmp_path / "streamwise" / "proto").glob("*_pb2*.py"))
    assert generated, "generator produced nothing"
    for path in generated:
        committed = ROOT / "streamwise" / "proto" / path.name
        assert committed.exists(), f"{path.name} is not committed"
        assert _without_stamps(committed.read_text()) == _without_stamps(path.read_text()), (
            f"{committed} is stale: run `python scripts/gen_proto.py` and commit the result"
        )
