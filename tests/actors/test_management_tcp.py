"""The management API on a TCP port with TLS, for remote operators: real drivers,
real TLS handshakes, the real CLI."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import grpc
import pytest

import streamwise
from streamwise.actors.management import remote_driver
from streamwise.exceptions import UsageError
from streamwise.proto import management_pb2, management_pb2_grpc


@streamwise.deployment
class Echo:
    async def __call__(self, x):
        return x


def _options(tls, **extra) -> streamwise.ManagementOptions:
    return streamwise.ManagementOptions.from_files(
        port=0,
        host="127.0.0.1",
        ssl_certificate_file=str(tls.server_cert),
        ssl_private_key_file=str(tls.server_key),
        **extra,
    )


def _token() -> tuple[tuple[str, str], ...]:
    with open(streamwise.management_token_file()) as f:
        return (("sw-auth", f.read().strip()),)


def _list(channel: grpc.Channel, metadata=()) -> management_pb2.ListApplicationsReply:
    stub = management_pb2_grpc.ManagementStub(channel)
    return stub.ListApplications(management_pb2.ListApplicationsRequest(), metadata=metadata, timeout=10)


def _refuses_connections(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) != 0


def test_tcp_without_tls_is_refused(tls_files):
    """ManagementOptions will not describe a plaintext TCP listener, and says why;
    nor take a path where PEM bytes belong."""
    with pytest.raises(UsageError, match="TLS only"):
        streamwise.ManagementOptions(port=9500)
    with pytest.raises(UsageError, match="not its path"):
        streamwise.ManagementOptions(port=9500, ssl_certificate=str(tls_files.server_cert), ssl_private_key=b"x")
    with pytest.raises(UsageError, match="port must be 0..65535"):
        streamwise.ManagementOptions(port=70000, ssl_certificate=b"", ssl_private_key=b"")
    with pytest.raises(UsageError, match="cannot read ssl_client_ca_file"):
        _options(tls_files, ssl_client_ca_file=str(tls_files.ca) + ".missing")
    assert b"PRIVATE KEY" not in repr(_options(tls_files)).encode()


def test_every_call_needs_the_token(serve, tls_files):
    """Over TLS, a call without the management token, or with a wrong one, gets
    UNAUTHENTICATED; with it, the call is served. Shutdown closes the port."""
    serve(Echo.bind(), management=_options(tls_files))
    address = streamwise.management_address()
    credentials = grpc.ssl_channel_credentials(tls_files.ca.read_bytes())
    with grpc.secure_channel(address, credentials) as channel:
        for metadata in ((), (("sw-auth", "0" * 32),)):
            with pytest.raises(grpc.RpcError) as info:
                _list(channel, metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = _list(channel, _token())
    assert [app.name for app in reply.applications] == ["default"]
    assert reply.driver_pid == os.getpid()
    run_dir = os.path.dirname(streamwise.management_token_file())
    streamwise.shutdown()
    assert _refuses_connections(address)
    assert not os.path.exists(run_dir)


def test_a_plaintext_client_cannot_talk_to_it(serve, tls_files):
    """A client without TLS gets no answer, even with the token; the listener then
    still serves TLS clients."""
    serve(Echo.bind(), management=_options(tls_files))
    address = streamwise.management_address()
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _list(channel, _token())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_files.ca.read_bytes())) as channel:
        assert [app.name for app in _list(channel, _token()).applications] == ["default"]


def test_with_a_client_ca_both_a_certificate_and_the_token_are_needed(serve, tls_files):
    """With ssl_client_ca, a client without a certificate is refused in the TLS
    handshake; one with a certificate but no token gets UNAUTHENTICATED; one with
    both is served (also through the CLI's client)."""
    serve(Echo.bind(), management=_options(tls_files, ssl_client_ca_file=str(tls_files.ca)))
    address = streamwise.management_address()
    ca = tls_files.ca.read_bytes()
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _list(channel, _token())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    mutual = grpc.ssl_channel_credentials(
        ca, private_key=tls_files.client_key.read_bytes(), certificate_chain=tls_files.client_cert.read_bytes()
    )
    with grpc.secure_channel(address, mutual) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _list(channel)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(UsageError, match="cannot connect with TLS"):
        remote_driver(address, token_file=streamwise.management_token_file(), ca_cert_file=str(tls_files.ca))
    driver = remote_driver(
        address,
        token_file=streamwise.management_token_file(),
        ca_cert_file=str(tls_files.ca),
        cert_file=str(tls_files.client_cert),
        key_file=str(tls_files.client_key),
    )
    assert driver.pid == os.getpid()


_APP = textwrap.dedent(
    """
    import streamwise

    @streamwise.deployment
    class Echo:
        async def __call__(self, x):
            return x

    app = Echo.bind()
    """
)


def _cli(*args: str, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamwise.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=60, env=env
    )


def test_cli_runs_a_driver_operators_reach_over_tls(tmp_path, tls_files):
    """`streamwise run --management-port` listens with TLS; `status --json`,
    `scale` and `shutdown --address` reach it from "another machine" (no run
    directory lookup) with the CA and a copy of the token; `logs` says it needs the
    local run dir; a wrong token is a clear error. Without a certificate, `run`
    refuses to start."""
    (tmp_path / "echo_app.py").write_text(_APP)
    plain = _cli("run", "echo_app:app", "--management-port", "0", cwd=tmp_path)
    assert plain.returncode == 1 and "TLS only" in plain.stderr
    driver = subprocess.Popen(
        [
            sys.executable, "-m", "streamwise.cli", "run", "echo_app:app", "--name", "shop", "--metrics-port", "-1",
            "--management-port", "0", "--management-host", "127.0.0.1",
            "--management-cert", str(tls_files.server_cert), "--management-key", str(tls_files.server_key),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = driver.stdout.readline()
        assert "is running" in line, line
        address = line.split("management on ")[1].split(" ")[0]
        token_copy = tmp_path / "token"  # what an operator copies to their machine
        token_copy.write_bytes(pathlib.Path(line.split("token in ")[1].split(")")[0]).read_bytes())
        remote = ["--address", address, "--ca-cert", str(tls_files.ca), "--token-file", str(token_copy)]
        status = _cli("status", "--json", *remote, cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        (app,) = json.loads(status.stdout)["applications"]
        assert (app["name"], app["driver_pid"], app["deployments"][0]["running_replicas"]) == ("shop", driver.pid, 1)
        # The same through the environment.
        env = {
            **os.environ,
            "STREAMWISE_MANAGEMENT_ADDRESS": address,
            "STREAMWISE_MANAGEMENT_CA_CERT": str(tls_files.ca),
            "STREAMWISE_MANAGEMENT_TOKEN_FILE": str(token_copy),
        }
        scaled = _cli("scale", "shop", "Echo", "2", cwd=tmp_path, env=env)
        assert scaled.returncode == 0, scaled.stderr
        assert scaled.stdout.strip().splitlines()[-1] == "Echo: 2/2 running"
        logs = _cli("logs", "shop", *remote, cwd=tmp_path)
        assert logs.returncode == 1 and "logs needs the local run dir" in logs.stderr
        (tmp_path / "wrong").write_text("f" * 32)
        wrong = _cli("status", "--address", address, "--ca-cert", str(tls_files.ca), "--token-file",
                     str(tmp_path / "wrong"), cwd=tmp_path)
        assert wrong.returncode == 1 and "refused the management token" in wrong.stderr
        assert _cli("shutdown", *remote, cwd=tmp_path).returncode == 0
        assert driver.wait(timeout=60) == 0
        assert _refuses_connections(address)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        driver.stdout.close()


def test_a_port_in_use_is_a_clear_error_and_the_driver_serves_on(serve, tls_files):
    """Asking for a port another socket holds fails naming the address; the driver
    still runs the app."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        options = streamwise.ManagementOptions(
            port=port,
            ssl_certificate=tls_files.server_cert.read_bytes(),
            ssl_private_key=tls_files.server_key.read_bytes(),
        )
        with pytest.raises(UsageError, match=f"cannot serve the management API on 127.0.0.1:{port}"):
            serve(Echo.bind(), management=options)
    assert serve(Echo.bind()).remote("still here").result() == "still here"
