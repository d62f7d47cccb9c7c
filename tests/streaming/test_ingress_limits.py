"""The ingress bounds what clients hold, and serves good clients again after a flood.

Floods are bounded (a few hundred sockets) and stay on loopback.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import textwrap

import grpc
import pytest

import streamwise
from streamwise.proto import predict_pb2, predict_pb2_grpc

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SETTINGS, _GOAWAY = 0x4, 0x7
_MAX_CONCURRENT_STREAMS = 0x3


@streamwise.deployment
class Echo:
    async def __call__(self, inputs: dict) -> bytes:
        return inputs["x"]


def _good_request(address: str, timeout: float = 5) -> bytes:
    with grpc.insecure_channel(address) as channel:
        stub = predict_pb2_grpc.PredictAPIsServiceStub(channel)
        reply = stub.Predict(predict_pb2.PredictRequest(input={"x": b"ok"}), timeout=timeout, wait_for_ready=True)
    return reply.prediction


def _serve(serve, **limits) -> str:
    serve(Echo.bind(), grpc_options=streamwise.GrpcOptions(port=0, host="127.0.0.1", **limits))
    return streamwise.ingress_address()


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def _frames(sock: socket.socket):
    """HTTP/2 frames the server sends: (type, payload), until it closes."""
    buffer = b""
    while True:
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            kind, payload, buffer = buffer[3], buffer[9 : 9 + length], buffer[9 + length :]
            yield kind, payload
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return
        if not chunk:
            return
        buffer += chunk


def _h2_hello(sock: socket.socket) -> None:
    sock.sendall(_PREFACE + struct.pack("!I", 0)[1:] + bytes([_SETTINGS, 0]) + struct.pack("!I", 0))


def test_the_server_announces_its_stream_limit(serve):
    """A connection is told how many concurrent calls it may run (SETTINGS_MAX_CONCURRENT_STREAMS)."""
    address = _serve(serve, max_concurrent_streams=7)
    with _connect(address) as sock:
        _h2_hello(sock)
        kind, payload = next(f for f in _frames(sock) if f[0] == _SETTINGS and f[1])
        settings = dict(struct.unpack("!HI", payload[i : i + 6]) for i in range(0, len(payload), 6))
    assert settings[_MAX_CONCURRENT_STREAMS] == 7


def test_an_idle_connection_is_closed(serve):
    """A connection that runs no call for idle_timeout_s is sent GOAWAY."""
    address = _serve(serve, idle_timeout_s=0.2)
    with _connect(address) as sock:
        _h2_hello(sock)
        kinds = [kind for kind, _ in _frames(sock)]
    assert _GOAWAY in kinds
    assert _good_request(address) == b"ok"


def test_connections_past_the_cap_are_closed_at_once(serve):
    """With max_connections held by clients that finished their handshake, one more
    connection is closed at once (long before any timeout); once they leave, a good
    client is served."""
    address = _serve(serve, max_connections=5, handshake_timeout_s=60, idle_timeout_s=None)
    held = [_connect(address) for _ in range(5)]
    try:
        for sock in held:
            _h2_hello(sock)
            next(f for f in _frames(sock) if f[0] == _SETTINGS)  # the server took it
        with _connect(address) as extra:
            extra.settimeout(20)  # a third of the handshake timeout
            _h2_hello(extra)
            assert all(kind != _SETTINGS for kind, _ in _frames(extra))  # closed unanswered
    finally:
        for sock in held:
            sock.close()
    assert _good_request(address) == b"ok"


def test_connections_that_send_nothing_are_closed_and_good_clients_served(serve):
    """Past max_connections new connections are closed at once; those that never
    finish their handshake are closed after handshake_timeout_s; then a good client
    is served."""
    address = _serve(serve, max_connections=20, handshake_timeout_s=0.5)
    flood = [_connect(address) for _ in range(200)]
    try:
        for sock in flood:  # each is closed by the server: over the cap, or silent too long
            for _ in _frames(sock):
                pass
    finally:
        for sock in flood:
            sock.close()
    assert _good_request(address) == b"ok"


_DRIVER = textwrap.dedent(
    """
    import resource, sys, streamwise
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    @streamwise.deployment
    class Echo:
        async def __call__(self, inputs):
            return inputs["x"]

    streamwise.run(Echo.bind(), grpc_options=streamwise.GrpcOptions(
        port=0, host="127.0.0.1", max_connections=100_000, handshake_timeout_s=60))
    print(streamwise.ingress_address(), flush=True)
    sys.stdin.read()  # serve until the test closes our stdin
    streamwise.shutdown()
    """
)


def test_a_descriptor_flood_leaves_the_ingress_serving():
    """With a descriptor limit of 256, a flood of 400 silent connections is capped
    (at half the limit) and, once it ends, good clients are served again."""
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        address = driver.stdout.readline().strip()
        assert address, driver.stderr.read()
        assert _good_request(address) == b"ok"
        flood = []
        try:
            for _ in range(400):
                flood.append(_connect(address))
        finally:
            for sock in flood:
                sock.close()
        assert _good_request(address, timeout=30) == b"ok"
        driver.stdin.close()
        assert driver.wait(timeout=60) == 0
        assert "128 connections" in driver.stderr.read()  # the cap it warned about
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pipe in (driver.stdin, driver.stdout, driver.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


@pytest.mark.parametrize(
    "field,value",
    [("max_connections", 0), ("max_concurrent_streams", -1), ("handshake_timeout_s", 0), ("idle_timeout_s", 0)],
)
def test_limits_are_validated(field, value):
    """A limit that makes no sense is refused when the options are made, naming it."""
    with pytest.raises(streamwise.exceptions.UsageError, match=field):
        streamwise.GrpcOptions(**{field: value})
