"""The gRPC ingress against real clients generated from .proto files."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal

import grpc
import ingress_echo_pb2 as pb
import ingress_echo_pb2_grpc as pb_grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import streamwise
from streamwise.proto import predict_pb2, predict_pb2_grpc


@streamwise.deployment(num_replicas=1, max_ongoing_requests=100)
class EchoService:
    def __init__(self, marker: str = ""):
        if marker and os.path.exists(marker):
            raise RuntimeError("marked as unable to start")
        self.finalized = asyncio.Event()
        self.started = asyncio.Event()
        self.seen = 0
        self.seen_changed = asyncio.Event()

    async def Unary(self, msg):
        return pb.Msg(text=msg.text.upper(), n=msg.n + 1)

    async def ServerStream(self, msg):
        for i in range(msg.n):
            yield pb.Msg(text=msg.text, n=i)

    async def ClientStream(self, msgs):
        texts = []
        async for msg in msgs:
            texts.append(msg.text)
            self.seen += 1
            self.seen_changed.set()
        return pb.Msg(text="".join(texts), n=len(texts))

    async def Bidi(self, msgs):
        async for msg in msgs:
            yield pb.Msg(text=msg.text * 2, n=msg.n)

    async def Endless(self, msg):
        try:
            i = 0
            while True:
                yield pb.Msg(n=i)
                i += 1
                await asyncio.sleep(0.005)
        finally:
            self.finalized.set()

    async def Fail(self, msg):
        raise ValueError(f"cannot handle {msg.text}")

    async def Slow(self, msg):
        try:
            self.started.set()
            await asyncio.sleep(3600)
        finally:
            self.finalized.set()

    async def Context(self, msg):
        ctx = streamwise.get_request_context()
        return pb.Msg(text=f"{ctx.multiplexed_model_id}|{ctx.session_id}|{ctx.request_id}")

    async def wait_finalized(self) -> bool:
        await asyncio.wait_for(self.finalized.wait(), 10)
        return True

    async def wait_started(self) -> bool:
        await asyncio.wait_for(self.started.wait(), 10)
        return True

    async def wait_seen(self, n: int) -> int:
        while self.seen < n:
            self.seen_changed.clear()
            await asyncio.wait_for(self.seen_changed.wait(), 10)
        return self.seen

    async def pid(self) -> int:
        return os.getpid()


@streamwise.deployment
class Predictor:
    async def __call__(self, inputs: dict) -> bytes:
        return b",".join(f"{k}={v.decode()}".encode() for k, v in sorted(inputs.items()))

    async def predict_stream(self, inputs: dict):
        for key in sorted(inputs):
            yield key.encode()


OPTIONS = dict(port=0, host="127.0.0.1", servicer_functions=[pb_grpc.add_EchoServicer_to_server])


@pytest.fixture
def echo(serve):
    """An EchoService app behind the ingress; yields (python handle, channel target)."""
    handle = serve(EchoService.bind(), grpc_options=streamwise.GrpcOptions(**OPTIONS))
    return handle, streamwise.ingress_address()


def run(coro):
    return asyncio.run(coro)


async def _unary_ok(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await pb_grpc.EchoStub(channel).Unary(pb.Msg(text="ok", n=1))
        assert (reply.text, reply.n) == ("OK", 2)


def test_builtin_schema(serve):
    """Predict calls __call__ with the input map; PredictStream streams predict_stream."""
    serve(Predictor.bind(), grpc_options=streamwise.GrpcOptions(port=0, host="127.0.0.1"))

    async def main():
        async with grpc.aio.insecure_channel(streamwise.ingress_address()) as channel:
            stub = predict_pb2_grpc.PredictAPIsServiceStub(channel)
            request = predict_pb2.PredictRequest(input={"b": b"2", "a": b"1"})
            reply = await stub.Predict(request)
            streamed = [r.prediction async for r in stub.PredictStream(request)]
        return reply.prediction, streamed

    assert run(main()) == (b"a=1,b=2", [b"a", b"b"])


def test_all_four_cardinalities(echo):
    """Unary, server, client and bidirectional streaming RPCs map onto same-named methods."""
    _, address = echo

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.EchoStub(channel)
            unary = await stub.Unary(pb.Msg(text="hi", n=1))
            server = [m.n async for m in stub.ServerStream(pb.Msg(text="x", n=4))]

            async def inputs():
                for t in ("a", "b", "c"):
                    yield pb.Msg(text=t)

            client = await stub.ClientStream(inputs())
            bidi = [m.text async for m in stub.Bidi(inputs())]
        return unary, server, client, bidi

    unary, server, client, bidi = run(main())
    assert (unary.text, unary.n) == ("HI", 2)
    assert server == [0, 1, 2, 3]
    assert (client.text, client.n) == ("abc", 3)
    assert bidi == ["aa", "bb", "cc"]


def test_client_stream_forwarded_as_it_arrives(echo):
    """The replica sees each client-stream message before the client sends the next."""
    handle, address = echo

    async def main():
        async def inputs():
            yield pb.Msg(text="first")
            # Only continue once the replica has consumed the first message: if the
            # ingress buffered the stream whole, this would never happen.
            assert await handle.wait_seen.remote(1) == 1
            yield pb.Msg(text="second")

        async with grpc.aio.insecure_channel(address) as channel:
            return await pb_grpc.EchoStub(channel).ClientStream(inputs())

    assert run(main()).text == "firstsecond"


def test_bidi_is_interactive(echo):
    """Each bidirectional reply arrives before the next request is sent."""
    _, address = echo

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.EchoStub(channel).Bidi()
            out = []
            for text in ("a", "b"):
                await call.write(pb.Msg(text=text))
                out.append((await call.read()).text)
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
        return out

    assert run(main()) == ["aa", "bb"]


def test_metadata_passes_through(echo):
    """model id and session id reach the replica; request_id comes back in trailers."""
    _, address = echo

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.EchoStub(channel)
            call = stub.Context(
                pb.Msg(), metadata=(("multiplexed_model_id", "m1"), ("session_id", "s1"), ("request_id", "r-42"))
            )
            reply = await call
            trailers = dict(await call.trailing_metadata())
            generated = stub.Unary(pb.Msg())
            await generated
            generated_trailers = dict(await generated.trailing_metadata())
        return reply.text, trailers, generated_trailers

    text, trailers, generated = run(main())
    assert text == "m1|s1|r-42"
    assert trailers["request_id"] == "r-42"
    assert len(generated["request_id"]) == 16


def test_application_metadata_selects_app(serve):
    """With two apps, `application` picks one; an unknown name is NOT_FOUND listing apps."""
    options = streamwise.GrpcOptions(**OPTIONS)
    serve(EchoService.bind(), name="one", grpc_options=options)
    serve(Predictor.bind(), name="two", grpc_options=options)

    async def main():
        async with grpc.aio.insecure_channel(streamwise.ingress_address()) as channel:
            stub = pb_grpc.EchoStub(channel)
            reply = await stub.Unary(pb.Msg(text="a"), metadata=(("application", "one"),))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Unary(pb.Msg(), metadata=(("application", "three"),))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "one" in info.value.details() and "two" in info.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Unary(pb.Msg(), metadata=(("application", "two"),))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND  # Predictor has no Unary
            assert "Unary" in info.value.details()
        return reply.text

    assert run(main()) == "A"


def test_unknown_method_not_found(echo):
    """An RPC the server does not serve is NOT_FOUND, listing the served methods."""
    _, address = echo

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/swtest.Echo/Nope")(b"")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "/swtest.Echo/Unary" in info.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.EchoStub(channel).Missing(pb.Msg())
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        await _unary_ok(address)

    run(main())


def test_undecodable_request_invalid_argument(echo):
    """Bytes that are not the RPC's request message get INVALID_ARGUMENT."""
    _, address = echo

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/swtest.Echo/Unary")(b"\xff\xff\xff")
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await _unary_ok(address)

    run(main())


def test_user_exception_is_internal_without_traceback(echo):
    """A user exception becomes INTERNAL with its type and message, no traceback."""
    _, address = echo

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.EchoStub(channel).Fail(pb.Msg(text="this"))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert info.value.details() == "ValueError: cannot handle this"
        await _unary_ok(address)

    run(main())


def test_client_deadline_cancels_generator(echo):
    """A client deadline gives DEADLINE_EXCEEDED and the replica's generator's finally runs."""
    handle, address = echo

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.EchoStub(channel).Endless(pb.Msg(), timeout=3)
            assert (await call.read()).n == 0  # the generator runs; now let the deadline pass
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await handle.wait_finalized.remote()
        await _unary_ok(address)

    run(main())


def test_client_cancel_mid_stream_cancels_generator(echo):
    """A client that cancels mid-stream cancels the replica's generator."""
    handle, address = echo

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.EchoStub(channel).Endless(pb.Msg())
            assert (await call.read()).n == 0
            call.cancel()
        assert await handle.wait_finalized.remote()
        await _unary_ok(address)

    run(main())


def test_request_timeout_is_deadline_exceeded(serve):
    """request_timeout_s ends a slow call with DEADLINE_EXCEEDED and cancels it in the replica."""
    handle = serve(
        EchoService.bind(), grpc_options=streamwise.GrpcOptions(**OPTIONS, request_timeout_s=2)
    )
    address = streamwise.ingress_address()

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.EchoStub(channel).Slow(pb.Msg())
            assert await handle.wait_started.remote()  # running in the replica; now time out
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await handle.wait_finalized.remote()
        await _unary_ok(address)

    run(main())


def test_message_over_limit_resource_exhausted(serve):
    """A request over max_message_length is RESOURCE_EXHAUSTED, naming the limit."""
    serve(EchoService.bind(), grpc_options=streamwise.GrpcOptions(**OPTIONS, max_message_length=1000))
    address = streamwise.ingress_address()

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.EchoStub(channel).Unary(pb.Msg(text="x" * 5000))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "1000" in info.value.details()
        await _unary_ok(address)

    run(main())


def test_no_live_replica_unavailable(serve, tmp_path):
    """With no replica alive (it died and cannot restart), calls get UNAVAILABLE."""
    marker = tmp_path / "broken"
    handle = serve(
        EchoService.bind(str(marker)),
        grpc_options=streamwise.GrpcOptions(**OPTIONS, replica_wait_timeout_s=0.5),
    )
    address = streamwise.ingress_address()
    pid = handle.pid.remote().result()
    marker.write_text("x")
    os.kill(pid, signal.SIGKILL)
    psutil.wait_procs([p for p in psutil.Process().children() if p.pid == pid], timeout=10)

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.EchoStub(channel).Unary(pb.Msg())
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    run(main())


def test_health_and_reflection(echo):
    """Health reports SERVING for the app's services; reflection lists them."""
    _, address = echo

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
            echo_status = await health.Check(health_pb2.HealthCheckRequest(service="swtest.Echo"))
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def ask():
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            services = []
            async for response in refl.ServerReflectionInfo(ask()):
                services = [s.name for s in response.list_services_response.service]
        return overall.status, echo_status.status, services

    overall, echo_status, services = run(main())
    assert overall == echo_status == health_pb2.HealthCheckResponse.SERVING
    assert {"swtest.Echo", "streamwise.PredictAPIsService", "grpc.health.v1.Health"} <= set(services)


def test_health_not_serving_while_draining(serve):
    """During shutdown the ingress reports NOT_SERVING while running calls finish."""
    serve(EchoService.bind(), grpc_options=streamwise.GrpcOptions(**OPTIONS, drain_timeout_s=30))
    address = streamwise.ingress_address()

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            stream = pb_grpc.EchoStub(channel).Endless(pb.Msg())
            assert (await stream.read()).n == 0  # a call in flight keeps the drain open
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            stopper = asyncio.get_running_loop().run_in_executor(None, streamwise.shutdown)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            stream.cancel()  # lets the drain finish
            await stopper

    run(main())


def test_many_streams_multiplexed_on_one_channel(serve):
    """64 concurrent streams on one channel, over 2 replicas, all complete and in order."""
    serve(EchoService.options(num_replicas=2).bind(), grpc_options=streamwise.GrpcOptions(**OPTIONS))

    async def main():
        async with grpc.aio.insecure_channel(streamwise.ingress_address()) as channel:
            stub = pb_grpc.EchoStub(channel)

            async def one(i):
                return [m.n async for m in stub.ServerStream(pb.Msg(text=str(i), n=50))]

            return await asyncio.gather(*(one(i) for i in range(64)))

    assert run(main()) == [list(range(50))] * 64


def _make_cert(tmp_path: pathlib.Path, name: str, issuer=None):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    cert = builder.sign(issuer_key, hashes.SHA256())
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert, key, pem, key_pem


def test_tls_and_mutual_tls(serve, tmp_path):
    """With a certificate the ingress speaks TLS; with a client CA it requires client certs."""
    ca, ca_key, ca_pem, _ = _make_cert(tmp_path, "test-ca")
    _, _, server_pem, server_key = _make_cert(tmp_path, "localhost", issuer=(ca, ca_key))
    _, _, client_pem, client_key = _make_cert(tmp_path, "client", issuer=(ca, ca_key))
    serve(
        EchoService.bind(),
        grpc_options=streamwise.GrpcOptions(
            **OPTIONS, ssl_certificate=server_pem, ssl_private_key=server_key, ssl_client_ca=ca_pem
        ),
    )
    port = streamwise.ingress_address().rsplit(":", 1)[1]
    target = f"localhost:{port}"

    async def main():
        good = grpc.ssl_channel_credentials(ca_pem, private_key=client_key, certificate_chain=client_pem)
        async with grpc.aio.secure_channel(target, good) as channel:
            reply = await pb_grpc.EchoStub(channel).Unary(pb.Msg(text="tls"))
        no_client_cert = grpc.ssl_channel_credentials(ca_pem)
        async with grpc.aio.secure_channel(target, no_client_cert) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.EchoStub(channel).Unary(pb.Msg(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        return reply.text

    assert run(main()) == "TLS"
