"""The internal plane serves the app's own processes only.

Attacks are made with the project's own generated clients, from outside the app:
as a second Unix user (created when the tests run as root), and as a process of the
app's own user that does not hold the app's secret.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import pwd
import stat
import subprocess
import sys
import textwrap

import grpc
import psutil
import pytest

import streamwise
from streamwise import _auth, objectstore
from streamwise.actors._runtime import RUNTIME
from streamwise.proto import controller_pb2, controller_pb2_grpc, replica_pb2, replica_pb2_grpc

INTRUDER = "streamwise-intruder"


@streamwise.deployment(user_config={"api_key": "s3cr3t-api-key"})
class Vault:
    def __init__(self, password: str):
        self.password = password

    def reconfigure(self, config):
        self.config = config

    async def __call__(self, value):
        return value


class _WritesFile:
    """Unpickling this creates ``path``: proof that a payload was decoded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _run_dir() -> str:
    assert RUNTIME.credentials is not None
    return RUNTIME.credentials.run_dir


def _replica_socket() -> str:
    (path,) = glob.glob(os.path.join(_run_dir(), "*.grpc"))
    return path


def _evil_call(marker: str) -> replica_pb2.CallRequest:
    return replica_pb2.CallRequest(
        method="__call__",
        codec="cloudpickle",
        args=pickle.dumps(((_WritesFile(marker),), {})),
        response_codec="cloudpickle",
    )


@pytest.fixture(scope="module")
def intruder() -> pwd.struct_passwd:
    """A second Unix user, created if missing (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create and act as a second Unix user")
    try:
        return pwd.getpwnam(INTRUDER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", INTRUDER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(INTRUDER)


# Runs as root until it drops to the intruder's uid, after every import is done.
_AS_INTRUDER = """
import json, os, pickle, socket, sys
import grpc
from streamwise.proto import controller_pb2, controller_pb2_grpc, replica_pb2, replica_pb2_grpc

uid, gid, run_dir, marker = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
names = json.loads(sys.argv[6])  # the real socket names (anyone can read them in /proc/net/unix)
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
results = {}
try:
    os.listdir(run_dir)
    results["list"] = "listed"
except PermissionError:
    results["list"] = "denied"
for name in names:
    path = os.path.join(run_dir, name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        results["connect:" + name] = "connected"
    except OSError as exc:
        results["connect:" + name] = type(exc).__name__
    finally:
        sock.close()
    if name.endswith(".local"):
        continue  # not a gRPC socket: the connect above is the attempt
    channel = grpc.insecure_channel("unix:" + path)
    try:
        if name == "controller":
            controller_pb2_grpc.ControllerStub(channel).GetReplicaSpec(
                controller_pb2.SpecRequest(replica_id="Vault#1"), timeout=5)
        else:
            replica_pb2_grpc.ReplicaStub(channel).Call(
                replica_pb2.CallRequest(method="__call__", codec="cloudpickle",
                                        args=bytes.fromhex(sys.argv[5])), timeout=5)
        results["rpc:" + name] = "OK"
    except grpc.RpcError as exc:
        results["rpc:" + name] = exc.code().name
    finally:
        channel.close()
print(json.dumps(results))
"""


def test_a_second_user_reaches_no_internal_server(serve, intruder, tmp_path):
    """Another user can neither list the run directory nor connect to any server in it
    (the controller, the replica's gRPC server, its same-node socket); no internal
    server listens on TCP; the app keeps serving."""
    handle = serve(Vault.bind("hunter2"))
    assert handle.remote(1).result() == 1
    marker = str(tmp_path / "ran")
    os.chmod(tmp_path, 0o777)  # the intruder could create the marker, were its payload run
    payload = pickle.dumps(((_WritesFile(marker),), {})).hex()
    names = sorted(n for n in os.listdir(_run_dir()) if n == "controller" or n.endswith((".grpc", ".local")))
    assert len(names) == 3, names
    argv = [str(intruder.pw_uid), str(intruder.pw_gid), _run_dir(), marker, payload, json.dumps(names)]
    out = subprocess.run(
        [sys.executable, "-c", _AS_INTRUDER, *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert results.pop("list") == "denied"
    for name in names:
        assert results.pop(f"connect:{name}") == "PermissionError", name
    assert results == {f"rpc:{n}": "UNAVAILABLE" for n in names if not n.endswith(".local")}
    assert not os.path.exists(marker)
    listening = [
        c
        for p in [psutil.Process(), *psutil.Process().children(recursive=True)]
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening == [], f"internal servers listen on TCP: {listening}"
    assert handle.remote(2).result() == 2


@pytest.mark.parametrize("secret", [None, "0" * 64, "near-miss"], ids=["none", "wrong", "near-miss"])
def test_a_call_without_the_secret_is_refused_undecoded(serve, tmp_path, secret):
    """A replica refuses a call without the app secret with UNAUTHENTICATED, before it
    decodes a byte of it: a pickle that would create a file creates nothing."""
    handle = serve(Vault.bind("hunter2"))
    marker = str(tmp_path / "ran")
    if secret == "near-miss":  # the app's secret with its last character changed
        assert RUNTIME.credentials is not None
        real = RUNTIME.credentials.secret
        secret = real[:-1] + ("0" if real[-1] != "0" else "1")
    metadata = () if secret is None else (("sw-auth", secret),)
    with grpc.insecure_channel(f"unix:{_replica_socket()}") as channel:
        stub = replica_pb2_grpc.ReplicaStub(channel)
        for call in (stub.Call, stub.Stream):
            with pytest.raises(grpc.RpcError) as info:
                result = call(_evil_call(marker), metadata=metadata, timeout=10)
                list(result) if call is stub.Stream else result
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "not part of the app" in info.value.details()
    assert not os.path.exists(marker)
    assert handle.remote(3).result() == 3
    # The control: with the secret, the same payload is decoded (and the file appears).
    assert RUNTIME.credentials is not None
    with grpc.insecure_channel(f"unix:{_replica_socket()}") as channel:
        replica_pb2_grpc.ReplicaStub(channel).Call(
            _evil_call(marker), metadata=RUNTIME.credentials.metadata, timeout=10
        )
    assert os.path.exists(marker)


def test_the_rpcs_that_carry_chunks_refuse_callers_without_the_secret(serve, tmp_path):
    """CallCarried and Fetch (values crossing nodes) refuse a call without the app
    secret with UNAUTHENTICATED, before decoding it; with the secret, a ticket that
    names no waiting result fetches nothing (NOT_FOUND)."""
    handle = serve(Vault.bind("hunter2"))
    marker = str(tmp_path / "ran")
    carried = replica_pb2.StreamInput(call=_evil_call(marker))
    fetch = replica_pb2.FetchRequest(ticket=os.urandom(16))
    with grpc.insecure_channel(f"unix:{_replica_socket()}") as channel:
        stub = replica_pb2_grpc.ReplicaStub(channel)
        for start in (lambda: stub.CallCarried(iter([carried]), timeout=10), lambda: stub.Fetch(fetch, timeout=10)):
            with pytest.raises(grpc.RpcError) as info:
                list(start())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert RUNTIME.credentials is not None
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Fetch(fetch, metadata=RUNTIME.credentials.metadata, timeout=10))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert not os.path.exists(marker)
    assert handle.remote(3).result() == 3


def test_the_controller_refuses_callers_without_the_secret(serve):
    """Every controller RPC needs the app secret: no spec, no attach, no replica set."""
    serve(Vault.bind("hunter2"))
    with grpc.insecure_channel(RUNTIME.controller_address) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetReplicaSpec(controller_pb2.SpecRequest(replica_id="Vault#1"), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            list(stub.WatchReplicas(controller_pb2.WatchRequest(app="default", deployment="Vault"), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_only_the_launched_process_gets_a_spec_or_attaches(serve):
    """Holding the app secret is not enough to read a replica's spec or attach as it:
    that takes the token of the process launched for that replica id."""
    handle = serve(Vault.bind("hunter2"))
    assert RUNTIME.credentials is not None
    app_only = RUNTIME.credentials.metadata
    with grpc.insecure_channel(RUNTIME.controller_address) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        (replica,) = next(
            iter(stub.WatchReplicas(controller_pb2.WatchRequest(app="default", deployment="Vault"), metadata=app_only))
        ).replicas
        replica_id = replica.replica_id
        for token in (None, "f" * 32):
            metadata = app_only if token is None else (*app_only, ("sw-replica-token", token))
            with pytest.raises(grpc.RpcError) as info:
                stub.GetReplicaSpec(controller_pb2.SpecRequest(replica_id=replica_id), metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "hunter2" not in info.value.details() and "s3cr3t" not in info.value.details()
            attach = stub.Attach(
                controller_pb2.AttachRequest(replica_id=replica_id, address="unix:/tmp/fake.sock"),
                metadata=metadata,
                timeout=10,
            )
            with pytest.raises(grpc.RpcError) as info:
                list(attach)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        snapshot = next(
            iter(stub.WatchReplicas(controller_pb2.WatchRequest(app="default", deployment="Vault"), metadata=app_only))
        )
    assert [r.address for r in snapshot.replicas] == [replica.address]  # the real replica, still
    assert handle.remote(4).result() == 4


def test_one_replicas_token_does_not_open_another_replica(serve):
    """The token of one launched replica fetches no other replica's spec."""
    serve(Vault.options(num_replicas=2).bind("hunter2"))
    assert RUNTIME.credentials is not None
    controller = streamwise.actors.api._active.controller  # the driver's own, in this process
    (first, first_replica), (second, _) = sorted(
        (rid, replica) for rid, (_, replica) in controller._replicas.items()
    )
    metadata = (*RUNTIME.credentials.metadata, ("sw-replica-token", first_replica.token))
    with grpc.insecure_channel(RUNTIME.controller_address) as channel:
        stub = controller_pb2_grpc.ControllerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetReplicaSpec(controller_pb2.SpecRequest(replica_id=second), metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert first_replica.token not in repr(first_replica)


def test_secrets_stay_out_of_argv_and_environment(serve):
    """A replica's credentials reach it on stdin: its command line and environment,
    which other processes can read, hold no secret."""
    serve(Vault.bind("hunter2"))
    assert RUNTIME.credentials is not None
    secret = RUNTIME.credentials.secret
    assert secret not in repr(RUNTIME.credentials)
    for child in psutil.Process().children(recursive=True):
        assert secret not in " ".join(child.cmdline())
        assert all(secret not in value for value in child.environ().values())


_PLANT = """
import os, sys
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
planted = []
# A session directory of the intruder's, its lock world-writable and locked forever.
os.mkdir("/dev/shm/streamwise-1-deadbeef", 0o777)
os.chmod("/dev/shm/streamwise-1-deadbeef", 0o777)
fd = os.open("/dev/shm/streamwise-1-deadbeef/lock", os.O_RDWR | os.O_CREAT, 0o666)
# A FIFO named like a session's lock (opening it for reading would block forever).
os.mkfifo("/dev/shm/streamwise-2-cafebabe")
# A private (0700) session directory, but the intruder's, with a FIFO for a lock.
os.mkdir("/dev/shm/streamwise-4-0000aaaa", 0o700)
os.mkfifo("/dev/shm/streamwise-4-0000aaaa/lock")
# A run directory of the intruder's in /tmp, its lock not held.
os.mkdir("/tmp/streamwise-run-planted", 0o700)
open("/tmp/streamwise-run-planted/driver.lock", "w").close()
# Files named like the old flat layout of a stale session.
for name in ("streamwise-3-0badf00d-lock", "streamwise-3-0badf00d-o-x-4096", "streamwise-3-0badf00d-p-4096-aa"):
    with open("/dev/shm/" + name, "w") as f:
        f.write("planted")
    os.chmod("/dev/shm/" + name, 0o666)
print("planted")
"""

_PLANTED = [
    "/dev/shm/streamwise-1-deadbeef",
    "/dev/shm/streamwise-2-cafebabe",
    "/dev/shm/streamwise-4-0000aaaa",
    "/tmp/streamwise-run-planted",
    "/dev/shm/streamwise-3-0badf00d-lock",
    "/dev/shm/streamwise-3-0badf00d-o-x-4096",
    "/dev/shm/streamwise-3-0badf00d-p-4096-aa",
]


@pytest.fixture
def planted(intruder):
    out = subprocess.run(
        [sys.executable, "-c", _PLANT, str(intruder.pw_uid), str(intruder.pw_gid)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    yield _PLANTED
    for path in _PLANTED:
        if os.path.isdir(path) and not os.path.islink(path):
            for name in os.listdir(path):
                os.unlink(os.path.join(path, name))
            os.rmdir(path)
        elif os.path.lexists(path):
            os.unlink(path)


def test_files_planted_in_dev_shm_neither_hang_nor_get_used(planted, intruder):
    """Another user's files named like store sessions do not stop an app from starting
    and using its store; they are left alone; the app's own files are owner-only."""
    script = textwrap.dedent(
        """
        import glob, os, stat, streamwise
        import numpy as np

        @streamwise.deployment
        class Sum:
            def __call__(self, array):
                return int(array.sum())

        handle = streamwise.run(Sum.bind())
        ref = streamwise.put(np.ones(1 << 20, dtype=np.uint8))
        print(handle.remote(np.ones(1 << 20, dtype=np.uint8)).result() + int(streamwise.get(ref).sum()))
        modes = {}
        for path in glob.glob(f"/dev/shm/streamwise-{os.getpid()}-*") + glob.glob(f"/dev/shm/streamwise-{os.getpid()}-*/*"):
            modes[path] = stat.S_IMODE(os.lstat(path).st_mode)
        print(sorted(set(modes.values())))
        streamwise.shutdown()
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    total, modes = out.stdout.split("\n")[:2]
    assert total == str(2 << 20)
    assert set(json.loads(modes)) <= {0o700, 0o600}, modes
    for path in planted:
        info = os.lstat(path)
        assert info.st_uid == intruder.pw_uid, path
    assert stat.S_ISFIFO(os.lstat("/dev/shm/streamwise-2-cafebabe").st_mode)
    assert os.path.exists("/dev/shm/streamwise-1-deadbeef/lock")
    removed = objectstore.cleanup_stale()
    assert not {f"/dev/shm/{name}" for name in removed} & set(planted)  # nothing planted is judged ours
    assert not set(_auth.sweep_stale_run_dirs()) & set(planted)
    assert all(os.path.lexists(path) for path in planted)


_KILLED_DRIVER = """
import os, streamwise
from streamwise.actors._runtime import RUNTIME

@streamwise.deployment
class Echo:
    def __call__(self, x):
        return x

streamwise.run(Echo.bind())
print(RUNTIME.credentials.run_dir, flush=True)
os.kill(os.getpid(), 9)
"""


def test_a_killed_drivers_run_directory_is_swept_and_nothing_else(tmp_path):
    """The run directory of a SIGKILLed driver is removed by the next sweep; a
    directory of this user's named like one but holding no driver lock is kept."""
    out = subprocess.run([sys.executable, "-c", _KILLED_DRIVER], capture_output=True, text=True, timeout=60)
    run_dir = out.stdout.strip()
    assert run_dir and os.path.isdir(run_dir), out.stderr
    lookalike = os.path.join(os.path.dirname(run_dir), "streamwise-run-lookalike")
    os.mkdir(lookalike)
    try:
        for child in psutil.process_iter(["cmdline"]):  # its replicas die with it (they see it go)
            if run_dir in " ".join(child.info["cmdline"] or ()):
                child.wait(30)
        removed = _auth.sweep_stale_run_dirs()
        assert run_dir in removed and not os.path.exists(run_dir)
        assert os.path.isdir(lookalike)
    finally:
        os.rmdir(lookalike)


def test_a_dead_drivers_run_directory_kept_by_its_successor_is_swept_once_let_go(tmp_path):
    """A new driver taking back a dead driver's replicas keeps that driver's run
    directory (their sockets are in it): no sweep removes it, nor is it listed as a
    live driver's; a live driver's directory cannot be kept. Let go (the successor
    died), the next sweep removes it."""
    out = subprocess.run([sys.executable, "-c", _KILLED_DRIVER], capture_output=True, text=True, timeout=60)
    dead = out.stdout.strip()
    assert dead and os.path.isdir(dead), out.stderr
    kept = _auth.keep_run_dirs((dead, str(tmp_path / "nowhere")))
    assert [path for path, _ in kept] == [dead]
    live = _auth.new_credentials()  # it sweeps
    try:
        assert os.path.isdir(dead) and dead not in _auth.sweep_stale_run_dirs()
        assert _auth.keep_run_dirs((live.run_dir,)) == []
        assert dead not in _auth.live_run_dirs() and live.run_dir in _auth.live_run_dirs()
        _auth.release_kept(kept)
        assert dead in _auth.sweep_stale_run_dirs() and not os.path.exists(dead)
    finally:
        _auth.remove_run_dir(live)
