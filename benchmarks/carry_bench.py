"""The floor under a 100 MB value crossing nodes: one gRPC message vs chunks.

A TLS grpc.aio server in a child process (the other "node") sends 100 MB of a numpy
array to this process, which writes it into a file of /dev/shm (as a store segment
is written), in one of two shapes:

- one unary message holding it all (how a carried value travelled before chunks);
- a server stream of chunk messages of 256 KiB ... 16 MiB, cut from the array and
  serialized by hand as streamwise's chunk messages are (``streaming._chunks``),
  each written into the segment at its offset as it arrives.

Both over TLS, as between nodes. The end-to-end figure (a replica's 100 MB result
on another Ray node, next to Ray Serve's) is ``cluster_bench.py``'s; this one
shows what the transport alone costs, and picks ``_carry.CHUNK_BYTES``.

    python benchmarks/carry_bench.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
import numpy as np
from _common import say, stop_process

from streamwise._tls import SERVER_NAME, new_pair
from streamwise.streaming._chunks import Chunk, reply_bytes, reply_from

BIG = 100 * 2**20
SIZES = (64 * 2**10, 256 * 2**10, 512 * 2**10, 2**20, 4 * 2**20, 16 * 2**20)
_OPTIONS = (("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1))


# -- the child: the "other node" ----------------------------------------------------------


def _serve(tls_dir: str) -> None:
    with open(os.path.join(tls_dir, "key"), "rb") as f:
        key = f.read()
    with open(os.path.join(tls_dir, "cert"), "rb") as f:
        cert = f.read()
    array = np.ones(BIG, dtype=np.uint8)
    view = memoryview(array).cast("B")

    async def whole(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return bytes(view)  # the value joined into one message, as a carried envelope was

    async def chunks(request: bytes, context: grpc.aio.ServicerContext):
        size = int(request)
        for start in range(0, BIG, size):
            yield Chunk(view[start : start + size])

    async def main() -> None:
        server = grpc.aio.server(options=_OPTIONS)
        handlers = {
            "Whole": grpc.unary_unary_rpc_method_handler(whole),
            "Chunks": grpc.unary_stream_rpc_method_handler(chunks, response_serializer=reply_bytes),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("carry.Bench", handlers),))
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
        await server.start()
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
        await server.stop(0)

    asyncio.run(main())


# -- this process: the receiving node -------------------------------------------------------


async def _measure(address: str, cert: bytes, runs: int) -> dict[str, float]:
    options = (*_OPTIONS, ("grpc.ssl_target_name_override", SERVER_NAME))
    creds = grpc.ssl_channel_credentials(root_certificates=cert)
    fd, path = tempfile.mkstemp(dir="/dev/shm", prefix="carry-bench-")
    try:
        os.posix_fallocate(fd, 0, BIG)
        segment = mmap.mmap(fd, BIG, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        target = memoryview(segment)
        out: dict[str, float] = {}
        async with grpc.aio.secure_channel(address, creds, options=options) as channel:
            whole = channel.unary_unary("/carry.Bench/Whole")
            chunked = channel.unary_stream("/carry.Bench/Chunks", response_deserializer=reply_from)

            async def one_message() -> None:
                data = await whole(b"")
                target[: len(data)] = data

            def in_chunks(size: int):
                async def run() -> None:
                    offset = 0
                    async for chunk in chunked(str(size).encode()):
                        data = chunk.data
                        target[offset : offset + data.nbytes] = data
                        offset += data.nbytes
                    assert offset == BIG

                return run

            shapes = [("one message", one_message)]
            shapes += [(f"chunks of {size // 1024:,} KiB", in_chunks(size)) for size in SIZES]
            for label, run in shapes:
                await run()  # warm up
                times = []
                for _ in range(runs):
                    start = time.perf_counter()
                    await run()
                    times.append(time.perf_counter() - start)
                out[label] = min(times) * 1e3
        target.release()
        segment.close()
        return out
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve)
        return
    pair = new_pair()
    with tempfile.TemporaryDirectory() as tls_dir:
        for name, data in (("key", pair.private_key), ("cert", pair.certificate)):
            with open(os.path.join(tls_dir, name), "wb") as f:
                f.write(data)
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", tls_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert child.stdout is not None
            port = int(child.stdout.readline())
            figures = asyncio.run(_measure(f"127.0.0.1:{port}", pair.certificate, args.runs))
        finally:
            stop_process(child)
    say(f"100 MB from another process over TLS gRPC into /dev/shm (best of {args.runs})")
    floor = figures["one message"]
    for label, ms in figures.items():
        say(f"  {label:<22} {ms:8.1f} ms   {floor / ms:5.2f}x one message")


if __name__ == "__main__":
    main()
