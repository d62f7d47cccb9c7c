"""Shared fixtures: every test that runs an app gets a clean runtime and a leak check."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import pathlib
import threading

import psutil
import pytest

import streamwise
from streamwise.actors._runtime import RUNTIME


def _streamwise_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("streamwise")}


def _streamwise_shm() -> list[str]:
    """Shared-memory files of object store sessions this process started."""
    mine = f"streamwise-{os.getpid()}-"
    return [name for name in os.listdir("/dev/shm") if name.startswith(mine)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Tests marked both_transports run once per data-path transport.
    if "transport" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_transports"):
        metafunc.parametrize("transport", ["local", "grpc"], indirect=True)


@pytest.fixture
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The data path between processes: same-node sockets (the default here) or gRPC."""
    name = getattr(request, "param", "local")
    monkeypatch.setenv("STREAMWISE_LOCAL_TRANSPORT", "1" if name == "local" else "0")
    return name


@pytest.fixture
def serve(transport):
    """Yield ``streamwise.run``; afterwards shut down and assert nothing is left behind."""
    yield streamwise.run
    credentials = RUNTIME.credentials
    streamwise.shutdown()
    me = psutil.Process()
    children = me.children(recursive=True)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"processes left after shutdown: {alive}"
    assert not _streamwise_threads(), f"threads left after shutdown: {_streamwise_threads()}"
    assert not _streamwise_shm(), f"shared memory left after shutdown: {_streamwise_shm()}"
    if credentials is not None:
        assert not os.path.exists(credentials.run_dir), "run directory left after shutdown"


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test CA, a server certificate it signed (for localhost and
    127.0.0.1) and a client certificate it signed, each with its key."""

    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path


def _issue(name: str, issuer=None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert, key, cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def tls_files(tmp_path: pathlib.Path) -> TlsFiles:
    """A self-signed test CA with a server and a client certificate, as PEM files."""
    ca, ca_key, ca_pem, _ = _issue("streamwise-test-ca")
    _, _, server_pem, server_key = _issue("localhost", issuer=(ca, ca_key))
    _, _, client_pem, client_key = _issue("operator", issuer=(ca, ca_key))
    files = TlsFiles(*(tmp_path / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
    for path, data in zip(dataclasses.astuple(files), (ca_pem, server_pem, server_key, client_pem, client_key), strict=True):
        path.write_bytes(data)
    return files
