"""Helpers shared by the benchmark scripts in this directory.

What is here: reporting (``say``, ``verdict``, ``percentile``, ``expect``, the
"streamwise vs baseline" comparison lines), a call-rate loop, stopping a child
process and checking that none is left, the bare grpc.aio server (generic handlers
on raw bytes) run in a child process that reports its port over a pipe, and the
code generated from ``protos/bench.proto`` with ``Child``, the driver's side of a
child process that answers JSON lines (``ingress_bench.py --client``).

The scripts run as ``python benchmarks/X.py``, which puts this directory on
sys.path, so ``from _common import ...`` works in them and in the child processes
they start from a script file.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from time import perf_counter
from typing import Any, Self

# Keep gRPC core's routine connection logs out of the report (set before grpc loads);
# the scripts set it too, before their own import of grpc.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
import psutil

PROTO = pathlib.Path(__file__).resolve().parent / "protos" / "bench.proto"

# -- reporting --------------------------------------------------------------------------


def say(line: str = "") -> None:
    print(line, flush=True)


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISS"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def expect(got: object, want: object, what: str = "") -> None:
    """Check a result even under ``python -O`` (which strips asserts)."""
    if got != want:
        raise RuntimeError(f"{what + ': ' if what else ''}got {got!r}, expected {want!r}")


def compare(
    label: str,
    sw: str,
    base_label: str,
    base: str,
    ratio: float,
    target: str,
    mark: str,
    *,
    label_width: int = 22,
    base_label_width: int = 23,
    base_width: int = 15,
    who: str = "streamwise",
) -> str:
    """One figure of streamwise (or ``who``) beside its baseline, with their ratio and its verdict."""
    return (
        f"{label:<{label_width}}{who} {sw:>17}   {base_label:<{base_label_width}}{base:>{base_width}}   "
        f"ratio {ratio:6.2f}  ({target})  {mark}"
    )


def rate_line(
    label: str, sw: float, base: float, unit: str, minimum: float | None, *, base_label: str, **widths: int
) -> str:
    """``compare`` of two rates, judged by ``ratio >= minimum`` (None: no target)."""
    ratio = sw / base
    if minimum is None:
        target, mark = "no target", "-"
    else:
        target, mark = f"target >= {minimum:g}", verdict(ratio >= minimum)
    return compare(label, f"{sw:,.0f} {unit}", base_label, f"{base:,.0f} {unit}", ratio, target, mark, **widths)


def first_item_lines(
    sw: list[float], base: list[float], maximum: float | None, *, base_label: str, **widths: int
) -> list[str]:
    """``compare`` of p50 (judged by ``ratio <= maximum``) and p99 of two samples of
    seconds to a first item; ``{q}`` in ``base_label`` becomes the percentile."""
    lines = []
    for q in (50, 99):
        sw_ms = percentile(sw, q) * 1e3
        base_ms = percentile(base, q) * 1e3
        ratio = sw_ms / base_ms
        if q == 50 and maximum is not None:
            target, mark = f"target <= {maximum:g}", verdict(ratio <= maximum)
        else:
            target, mark = "no target", "-"
        lines.append(
            compare(
                f"first item p{q}", f"{sw_ms:.2f} ms", base_label.format(q=q), f"{base_ms:.2f} ms",
                ratio, target, mark, **widths,
            )
        )
    return lines


# -- measuring --------------------------------------------------------------------------


async def call_rate(call: Callable[[], Awaitable[object]], n: int, concurrency: int = 1) -> float:
    """Calls per second of ``n`` calls made by ``concurrency`` callers."""
    left = n

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    start = perf_counter()
    if concurrency == 1:
        await caller()
    else:
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(caller())
    return n / (perf_counter() - start)


# -- child processes ----------------------------------------------------------------------


@contextlib.contextmanager
def two_ray_nodes(node: dict[str, Any]) -> Iterator[str]:
    """Two Ray nodes on this machine (``ray.cluster_utils.Cluster``), "node_a" (the
    head, which this process joins) and "node_b" (each with 100 of a custom resource
    named after it), both made with ``node``; yields the cluster's address."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args=dict(node, resources={"node_a": 100}, include_dashboard=False)
    )
    try:
        cluster.add_node(**node, resources={"node_b": 100})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            yield cluster.address
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


def stop_process(process: subprocess.Popen[Any]) -> None:
    """Close its stdin (its cue to exit), then terminate and kill it if it lingers."""
    with contextlib.suppress(OSError):
        if process.stdin is not None:
            process.stdin.close()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def check_no_children(processes: list[psutil.Process] | None = None) -> None:
    """Wait for ``processes`` (default: this process's children) to exit; warn about
    and kill any that do not."""
    if processes is None:
        processes = psutil.Process().children(recursive=True)
    _, alive = psutil.wait_procs(processes, timeout=10)
    if alive:
        print(f"WARNING: processes left behind: {[p.pid for p in alive]}; killing them", file=sys.stderr)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()


async def serve_until_stdin_closes(server: grpc.aio.Server) -> None:
    """Start ``server`` on a free port, write the port to stdout, serve until stdin closes."""
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    try:
        # EOF on stdin is the parent's request to stop (it also comes if the parent dies).
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    finally:
        await server.stop(0)


# -- the bare grpc.aio server: generic handlers on raw bytes, no generated code -----------

BARE_ECHO = "/bench.Bench/Echo"
BARE_ITEMS = "/bench.Bench/Items"


async def _bare_echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _bare_items(request: bytes, context: grpc.aio.ServicerContext):
    """As many 8-byte items as the request says, one message each."""
    for i in range(int.from_bytes(request, "little")):
        yield i.to_bytes(8, "little")


async def serve_bare(methods: tuple[str, ...] = ("Echo", "Items")) -> None:
    """Serve ``methods`` of bench.Bench (Echo, Items) until stdin closes; the port first."""
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(_bare_echo),
        "Items": grpc.unary_stream_rpc_method_handler(_bare_items),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Bench", {m: handlers[m] for m in methods}),)
    )
    await serve_until_stdin_closes(server)


class BareServer:
    """``script --bare-server`` (which runs ``serve_bare``) in a child process; a
    context manager that always stops it."""

    def __init__(self, script: str) -> None:
        self._script = script
        self._process: subprocess.Popen[bytes] | None = None
        self.address = ""

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def __enter__(self) -> Self:
        self._process = subprocess.Popen(
            [sys.executable, self._script, "--bare-server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert self._process.stdout is not None
            line = self._process.stdout.readline()
            if not line.strip():
                raise RuntimeError(f"bare server exited before reporting its port (code {self._process.poll()})")
            self.address = f"127.0.0.1:{int(line)}"
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process(process)


# -- code generated from protos/bench.proto, and child processes driven by JSON lines ---


def generate_code(out: str) -> None:
    """bench_pb2 and bench_pb2_grpc from PROTO, into ``out``."""
    from grpc_tools import protoc

    include = pathlib.Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{PROTO.parent}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO),
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit code {code})")


@contextlib.contextmanager
def generated_code() -> Iterator[str]:
    """A temporary directory holding the code generated from PROTO; removed at the end."""
    out = tempfile.mkdtemp(prefix="streamwise-bench-protos-")
    try:
        generate_code(out)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def with_pythonpath(env: dict[str, str], path: str) -> dict[str, str]:
    """``env`` with ``path`` put first on its PYTHONPATH (changed in place, and returned)."""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH", "")) if p)
    return env


def import_generated() -> tuple[Any, Any]:
    """The generated modules bench_pb2 and bench_pb2_grpc (their directory on sys.path)."""
    return importlib.import_module("bench_pb2"), importlib.import_module("bench_pb2_grpc")


class Child:
    """``script`` run with ``args`` in its own process, which answers each JSON command
    line on its stdin with one JSON line on its stdout (or, a server, its port)."""

    def __init__(self, script: str, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )
        self.what = " ".join(args)

    def read_line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip():
            raise RuntimeError(f"{self.what} exited without answering (exit code {self.process.poll()})")
        return line

    def ask(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.process.stdin.flush()
        result = json.loads(self.read_line())
        if "error" in result:
            raise RuntimeError(f"client of {self.what}: {result['error']}")
        return result

    def stop(self) -> None:
        stop_process(self.process)
