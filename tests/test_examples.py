"""The examples users copy from keep working."""

import asyncio
import pathlib
import struct
import subprocess
import sys

import streamwise

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_prints_stream_and_exits_cleanly():
    """examples/quickstart.py prints the streamed words and the count, then exits 0."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[:3] == ["STREAMS", "ARRIVE", "ONE"]
    assert "words:" in out.stdout


def test_fruit_market_over_grpc(serve):
    """The FruitMarket client gets 10 oranges x 2.0 + 3 apples x 3.0 = 29.0."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import fruit_market
        import fruit_market_client
    finally:
        sys.path.remove(str(EXAMPLES))
    serve(fruit_market.app, grpc_options=streamwise.GrpcOptions(port=0, host="127.0.0.1"))
    response = asyncio.run(fruit_market_client.send_request(streamwise.ingress_address()))
    assert struct.unpack("f", response.prediction) == (29.0,)


def test_continuous_batching_example_runs():
    """examples/continuous_batching.py runs to completion and shows callers joining and leaving."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "continuous_batching.py")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    steps = [line for line in out.stdout.splitlines() if line.lstrip().startswith("step")]
    assert any("joined [" in line and "'epsilon'" in line for line in steps)  # it joined a running batch
    assert any("left [" in line for line in steps)
    assert all(int(line.split(":")[1].split()[0]) <= 4 for line in steps)  # never above max_batch_size
