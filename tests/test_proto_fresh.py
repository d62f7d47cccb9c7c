import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


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
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `python scripts/gen_proto.py` and commit the result"
        )
