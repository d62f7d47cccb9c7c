"""Who may speak the internal protocol: the processes of one app, and nobody else.

The internal protocol carries pickles, so whoever can send a call to a replica can
run code in it. Three things keep everyone else out (the README's "Security" section
draws the whole picture):

- **A run directory.** ``run()`` makes a private directory (mode 0700) and every
  internal server of the app, the controller's and each replica's gRPC server and
  same-node socket, listens on a Unix socket inside it. Only its owner can connect
  to such a socket, or create one there, so no other user can reach a server, nor
  stand in for one that has gone.
- **An app secret.** 32 random bytes made at ``run()``. Every call carries it (gRPC
  metadata ``sw-auth``; the first message of a same-node connection), and every
  server compares it in constant time before it reads the request: a caller without
  it gets ``UNAUTHENTICATED`` and none of its bytes are decoded. This keeps out the
  user's own processes that are not part of the app.
- **A token per replica process.** The controller accepts an ``Attach`` or hands out
  a replica's spec only to the process it launched for that replica id, which proves
  it with a token of its own.

Replicas get the secret and their token through one end of a socket pair that only
the launching process and the replica hold (a socket, unlike a pipe, cannot be
reopened through ``/proc/<pid>/fd``): never in argv or the environment, which other
processes can read, and never in a log or an error.

The driver holds a lock on ``driver.lock`` in its run directory for its whole life;
a run directory whose lock nobody holds belongs to a killed driver and is swept by
the next start or by ``streamwise cleanup``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hmac
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from streamwise._tls import SERVER_NAME, TlsPair, new_pair
from streamwise.config import env_internal_auth
from streamwise.exceptions import UsageError

log = logging.getLogger("streamwise.auth")

SECRET_KEY = "sw-auth"
REPLICA_TOKEN_KEY = "sw-replica-token"

# Unix socket paths hold at most 107 bytes; the run directory leaves room for names.
_MAX_RUN_DIR = 80

_REJECTED = "streamwise: this peer is not part of the app (missing or wrong credentials)"


_RUN_PREFIX = "streamwise-run-"
_LOCK = "driver.lock"
_KEPT = "kept.lock"  # a dead driver's run directory that a new driver keeps (keep_run_dirs)


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class Credentials:
    """An app's secret and run directory (``repr`` never shows the secret)."""

    secret: str
    run_dir: str
    required: bool = True  # False only with STREAMWISE_INTERNAL_AUTH=0, for measuring
    lock_fd: int = -1  # the driver's: held open (and locked) while the app runs
    tls: TlsPair | None = None  # set when the app spans machines (TCP between nodes)
    node_dir: bool = False  # run_dir is this process's own (a machine other than the driver's)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC call metadata that authenticates a call."""
        return ((SECRET_KEY, self.secret),) if self.required else ()

    def accepts(self, presented: str | bytes) -> bool:
        """Whether ``presented`` is the secret (compared in constant time)."""
        return same(presented, self.secret)

    def socket(self, name: str) -> str:
        """The path of a socket named ``name`` in the run directory."""
        return os.path.join(self.run_dir, name)

    def __repr__(self) -> str:
        return f"Credentials(run_dir={self.run_dir!r}, secret=<hidden>)"


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class Inherited:
    """A dead driver's app credentials, as its replicas' hand-offs hold them."""

    secret: str
    tls: TlsPair
    run_dirs: tuple[str, ...]  # where its replicas on the driver's machine keep their sockets

    def __repr__(self) -> str:
        return f"Inherited(run_dirs={self.run_dirs!r}, secret=<hidden>)"


def _run_root() -> str:
    root = tempfile.gettempdir()
    return root if len(root) <= _MAX_RUN_DIR - 20 else "/tmp"


def new_credentials(*, spans_machines: bool = False, inherited: Inherited | None = None) -> Credentials:
    """A fresh secret and a new private run directory, locked by this process
    (``remove_run_dir`` deletes it). ``inherited``: the secret and TLS pair of a
    dead driver's app instead of new ones, so that its replicas take this driver's
    calls and it theirs (the app's next driver takes them back).

    The lock is made under another name inside the directory and renamed once held,
    so a sweep never finds a live run directory's lock unlocked; and no name outside
    the private directory is ever renamed, so nobody can get in the way.
    """
    required = env_internal_auth()
    if spans_machines and not required:
        raise UsageError("STREAMWISE_INTERNAL_AUTH=0 is for one machine only: an app spanning machines needs its secret")
    tls = (inherited.tls if inherited is not None else new_pair()) if spans_machines else None
    sweep_stale_run_dirs()
    run_dir = tempfile.mkdtemp(prefix=_RUN_PREFIX, dir=_run_root())  # mode 0700, a name nobody had
    try:
        starting = os.path.join(run_dir, "." + _LOCK)
        fd = os.open(starting, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(starting, os.path.join(run_dir, _LOCK))
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if not required:
        log.warning("STREAMWISE_INTERNAL_AUTH=0: the app's internal servers serve any process of this user")
    credentials = Credentials(
        secret=inherited.secret if inherited is not None else secrets.token_hex(32), run_dir=run_dir,
        required=required, lock_fd=fd, tls=tls,
    )
    use_tls(credentials)
    return credentials


def replica_sockets(credentials: Credentials, pid: int) -> tuple[str, str]:
    """The paths of the gRPC and same-node sockets of the replica process ``pid``."""
    return credentials.socket(f"{pid}.grpc"), credentials.socket(f"{pid}.local")


def remove_sockets(credentials: Credentials, pid: int) -> None:
    for path in replica_sockets(credentials, pid):
        with contextlib.suppress(OSError):
            os.unlink(path)


def remove_run_dir(credentials: Credentials) -> None:
    shutil.rmtree(credentials.run_dir, ignore_errors=True)
    if credentials.lock_fd >= 0:
        with contextlib.suppress(OSError):
            os.close(credentials.lock_fd)


def keep_run_dirs(paths: tuple[str, ...]) -> list[tuple[str, int]]:
    """Keep the run directories of a dead driver whose replicas this driver takes
    back (their same-node sockets are there) from being swept: each lock nobody holds
    is taken and renamed ``kept.lock``, which ``live_run_dirs`` does not list. Returns
    (path, lock descriptor) of each kept; ``remove_kept`` ends them. Paths that are
    not such a directory of this user on this machine are left alone."""
    kept = []
    for path in paths:
        if os.path.dirname(path) != _run_root() or not os.path.basename(path).startswith(_RUN_PREFIX):
            continue  # not where run directories are made
        try:
            check_run_dir(path)
        except (OSError, UsageError):
            continue
        for name in (_LOCK, _KEPT):
            lock = os.path.join(path, name)
            try:
                fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if name == _LOCK:
                    os.rename(lock, os.path.join(path, _KEPT))
            except OSError:
                os.close(fd)  # held: a live driver's
                break
            kept.append((path, fd))
            break
    return kept


def remove_kept(kept: list[tuple[str, int]]) -> None:
    """Delete the directories ``keep_run_dirs`` kept (their replicas have exited)."""
    for path, _ in kept:
        shutil.rmtree(path, ignore_errors=True)
    release_kept(kept)


def release_kept(kept: list[tuple[str, int]]) -> None:
    """Stop keeping them: a later sweep deletes them."""
    for _, fd in kept:
        with contextlib.suppress(OSError):
            os.close(fd)


def sweep_stale_run_dirs() -> list[str]:
    """Delete this user's run directories whose driver is gone; their paths.

    Directories of other users, and anything that is not a plain directory, are
    left alone without being opened.
    """
    removed = []
    for path in _own_run_dirs():
        lock = os.path.join(path, _LOCK)
        if _abandoned(lock if os.path.lexists(lock) else os.path.join(path, _KEPT)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def live_run_dirs() -> list[str]:
    """This user's run directories whose driver is running."""
    return [path for path in _own_run_dirs() if _held(os.path.join(path, _LOCK))]


def _own_run_dirs() -> list[str]:
    """Directories named like run directories that this user owns (never following links)."""
    found = []
    with contextlib.suppress(OSError), os.scandir(_run_root()) as entries:
        for entry in entries:
            if not entry.name.startswith(_RUN_PREFIX):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
                found.append(entry.path)
    return sorted(found)


def _held(lock_path: str) -> bool:
    """Whether a driver holds the run directory lock ``lock_path``."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _abandoned(lock_path: str) -> bool:
    """Whether ``lock_path`` is a run directory's lock that no driver holds.

    A directory without one is not a run directory and is never removed.
    """
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False  # held (BlockingIOError) or not lockable: leave it
    finally:
        os.close(fd)
    return True


def check_run_dir(path: str) -> None:
    """Refuse a run directory that is not a private directory of this user."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise UsageError(f"run directory {path} is not a private directory of this user")


def new_token() -> str:
    return secrets.token_hex(16)


def same(presented: str | bytes, expected: str) -> bool:
    """Constant-time equality of a presented credential and the expected one."""
    if isinstance(presented, str):
        presented = presented.encode(errors="replace")
    return hmac.compare_digest(presented, expected.encode())


# -- handing credentials to a replica process -----------------------------------------


def write_handoff(credentials: Credentials, replica_token: str) -> bytes:
    """The line a launcher sends a replica process (see ``read_handoff``)."""
    fields = {
        "secret": credentials.secret,
        "run_dir": credentials.run_dir,
        "required": credentials.required,
        "token": replica_token,
    }
    if credentials.tls is not None:
        fields["tls"] = [credentials.tls.certificate.decode(), credentials.tls.private_key.decode()]
    return (json.dumps(fields) + "\n").encode()


def handoff_pair() -> tuple[socket.socket, socket.socket]:
    """(the launcher's end, the replica's end) of a new hand-off socket pair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.set_inheritable(True)
    return ours, theirs


def read_handoff(fd: int) -> tuple[Credentials, str]:
    """The replica's side: its app's credentials and its own token, from its end of
    the hand-off socket pair (descriptor ``fd``), which it then closes."""
    try:
        with socket.socket(fileno=fd) as sock, sock.makefile("rb") as stream:
            sock.settimeout(30)
            line = stream.readline(1 << 16)
    except OSError:
        line = b""
    try:
        credentials, token = parse_handoff(line)
    except ValueError:
        raise UsageError("a replica process must be started by streamwise (no credentials handed over)") from None
    if credentials.tls is not None and not os.path.isdir(credentials.run_dir):
        # Another machine than the driver's: this process's sockets go in a private
        # directory of its own (removed with remove_run_dir when it exits).
        run_dir = tempfile.mkdtemp(prefix="streamwise-node-", dir=_run_root())
        credentials = dataclasses.replace(credentials, run_dir=run_dir, node_dir=True)
    check_run_dir(credentials.run_dir)
    use_tls(credentials)
    return credentials, token


def parse_handoff(line: bytes) -> tuple[Credentials, str]:
    """The credentials and replica token ``write_handoff`` wrote (ValueError if it did not)."""
    try:
        fields = json.loads(line)
        tls = fields.get("tls")
        credentials = Credentials(
            secret=str(fields["secret"]),
            run_dir=str(fields["run_dir"]),
            required=fields["required"] is not False,
            tls=TlsPair(tls[0].encode(), tls[1].encode()) if tls else None,
        )
        return credentials, str(fields["token"])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise ValueError("not a replica's hand-off") from None


def presented(metadata: Any, key: str) -> str | None:
    """The value of ``key`` in a call's invocation metadata, if any."""
    for item in metadata or ():
        if item[0] == key:
            value = item[1]
            return value if isinstance(value, str) else None
    return None


# -- the server side ----------------------------------------------------------------


async def _reject(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REJECTED)


# A stream-stream handler without deserializers: it reads no request message at all.
_REJECT_HANDLER = grpc.stream_stream_rpc_method_handler(_reject)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Ends every call that does not carry the app secret, before its request is read."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        secret = presented(handler_call_details.invocation_metadata, SECRET_KEY)
        if secret is not None and self._credentials.accepts(secret):
            return await continuation(handler_call_details)
        return _REJECT_HANDLER


def internal_server(credentials: Credentials, options: Any) -> grpc.aio.Server:
    """A grpc.aio server that serves only callers holding ``credentials``."""
    interceptors = (AuthInterceptor(credentials),) if credentials.required else ()
    return grpc.aio.server(interceptors=interceptors, options=options)


def bind_unix(server: grpc.aio.Server, path: str) -> str:
    """Listen on the Unix socket ``path``; returns the gRPC target callers use."""
    target = f"unix:{path}"
    server.add_insecure_port(target)
    return target


def bind_tcp(server: grpc.aio.Server, credentials: Credentials, host: str, port: int = 0) -> str:
    """Listen on ``host:port`` (0: a free port) with the app's TLS; returns
    ``host:port``. RuntimeError if it cannot bind.

    Who may connect: anyone who reaches the port may open a TLS connection; every
    call must still carry the app's secret (``AuthInterceptor``), and a caller
    without it gets UNAUTHENTICATED before any of its bytes are decoded.
    """
    if credentials.tls is None or not credentials.required:
        raise UsageError("an internal TCP listener needs the app's TLS and secret (an app spanning machines)")
    tls = grpc.ssl_server_credentials([(credentials.tls.private_key, credentials.tls.certificate)])
    bound = server.add_secure_port(f"{host}:{port}", tls)
    if not bound:
        raise RuntimeError(f"could not bind {host}:{port}")
    return f"{host}:{bound}"


# -- the client side ----------------------------------------------------------------

_channel_tls: grpc.ChannelCredentials | None = None


def use_tls(credentials: Credentials) -> None:
    """Reach this app's TCP addresses with its TLS from now on (this process)."""
    global _channel_tls
    _channel_tls = (
        grpc.ssl_channel_credentials(root_certificates=credentials.tls.certificate)
        if credentials.tls is not None else None
    )


def channel(address: str, options: Any) -> grpc.aio.Channel:
    """A channel to one of the app's internal servers: a Unix socket (private to the
    app's user), or a TCP address served with the app's TLS, trusted only if it
    presents the app's certificate."""
    if address.startswith("unix:"):
        return grpc.aio.insecure_channel(address, options=options)
    if _channel_tls is None:
        raise UsageError(f"{address} is a TCP address, but this app does not span machines (no internal TLS)")
    return grpc.aio.secure_channel(
        address, _channel_tls, options=(*options, ("grpc.ssl_target_name_override", SERVER_NAME))
    )
