"""ZMQ endpoints: the private per-run IPC directory, tcp URIs, bind-and-report, unlinking."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import tempfile
import threading
import uuid
from typing import TYPE_CHECKING

import psutil

from shoal import envs
from shoal.logger import init_logger

if TYPE_CHECKING:
    import zmq

logger = init_logger(__name__)

IPC_DIR_PREFIX = "shoal-"
# A Unix socket path (sun_path) holds 108 bytes including the terminating NUL.
MAX_IPC_PATH_BYTES = 107
# `shoal-<owner pid>-<mkdtemp suffix>`: the pid lets a later run sweep a dead run's directory.
_RUN_DIR_RE = re.compile(rf"^{IPC_DIR_PREFIX}(\d+)-")

_lock = threading.Lock()
# SHOAL_RPC_BASE_PATH -> this process's run directory under it (normally exactly one).
_run_dirs: dict[str, str] = {}
_run_dirs_pid = os.getpid()
# IPC paths this process bound (bind_zmq_socket); unlinked at exit and on parent death.
_owned_ipc_paths: set[str] = set()
_atexit_registered = False


def ipc_run_dir() -> str:
    """This process's private IPC directory, created on first use.

    `<SHOAL_RPC_BASE_PATH>/shoal-<pid>-<random>`, mode 0700 (mkdtemp). Removed by
    `remove_ipc_run_dir()` and, as a safety net, at interpreter exit. Creating it also sweeps
    directories left by shoal runs whose owner process no longer exists.
    """
    global _run_dirs_pid
    base = envs.ENVS.rpc_base_path
    with _lock:
        if _run_dirs_pid != os.getpid():  # a forked child: the parent's directories are not ours
            _run_dirs.clear()
            _run_dirs_pid = os.getpid()
        run_dir = _run_dirs.get(base)
        if run_dir is not None and os.path.isdir(run_dir):
            return run_dir
        if not os.path.isdir(base):
            raise ValueError(f"SHOAL_RPC_BASE_PATH={base!r} is not a directory")
        sweep_stale_ipc_dirs(base)
        run_dir = _run_dirs[base] = tempfile.mkdtemp(
            prefix=f"{IPC_DIR_PREFIX}{os.getpid()}-", dir=base
        )
    _register_atexit()
    return run_dir


def remove_ipc_run_dir() -> None:
    """Remove this process's IPC directory and every socket file in it (idempotent; a later
    address gets a fresh directory). The launcher calls it once everything that bound there
    has been shut down."""
    with _lock:
        run_dirs = list(_run_dirs.values()) if _run_dirs_pid == os.getpid() else []
        _run_dirs.clear()
    for run_dir in run_dirs:
        shutil.rmtree(run_dir, ignore_errors=True)


def sweep_stale_ipc_dirs(base: str | None = None) -> list[str]:
    """Remove `shoal-<pid>-*` directories under `base` whose owner pid is gone.

    Only directories owned by this user are touched; a live (or reused) pid is left alone.
    Returns the removed paths. A launcher killed by SIGKILL cannot clean up after itself;
    the next run does it here.
    """
    base = envs.ENVS.rpc_base_path if base is None else base
    removed: list[str] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        match = _RUN_DIR_RE.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if psutil.pid_exists(int(match.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
        logger.info("removed IPC directory of dead run: %s", entry.path)
    return removed


def get_engine_client_zmq_addr(local_only: bool, host: str, port: int = 0) -> str:
    """A fresh ZMQ endpoint for one engine <-> client socket.

    `local_only=True`: `ipc://<run dir>/<random>` in the private per-run directory (host and
    port ignored); `ValueError` if the path would exceed the Unix socket limit (107 bytes:
    shorten SHOAL_RPC_BASE_PATH). Otherwise `tcp://host:port` (IPv6 literals bracketed);
    `port=0` is a placeholder the binder resolves: bind with `bind_zmq_socket`, which reads
    the port back through `zmq.LAST_ENDPOINT`. No port is ever probed in advance.
    """
    if not local_only:
        return get_tcp_uri(host, port)
    path = os.path.join(ipc_run_dir(), uuid.uuid4().hex[:16])
    if len(path.encode()) > MAX_IPC_PATH_BYTES:
        raise ValueError(
            f"IPC socket path {path!r} is longer than {MAX_IPC_PATH_BYTES} bytes; "
            "set SHOAL_RPC_BASE_PATH to a shorter directory"
        )
    return f"ipc://{path}"


def get_tcp_uri(host: str, port: int) -> str:
    """`tcp://host:port`, with an IPv6 literal bracketed (`tcp://[::1]:5555`).

    `ValueError` naming the field for an empty host or a port outside 0..65535.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port: must be an integer in 0..65535, got {port!r}")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError("host: must not be empty (use '*' for every interface)")
    if ":" in host:
        return f"tcp://[{host}]:{port}"
    return f"tcp://{host}:{port}"


def bind_zmq_socket(sock: zmq.Socket, address: str) -> str:
    """Bind `sock` to `address` and return the endpoint actually bound.

    A `tcp://host:0` placeholder comes back with the kernel-chosen port (read through
    `zmq.LAST_ENDPOINT`, so there is no probe-then-bind race); an IPC address comes back
    unchanged and its file is registered for removal when this process exits (or its parent
    dies; see `shoal.runtime.child`). IPv6 is enabled on the socket for a bracketed host.
    """
    import zmq

    if address.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)
    secure_socket(sock, address, is_server=True)
    sock.bind(address)
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    actual = endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)
    path = ipc_path(actual)
    if path is not None:
        with _lock:
            _owned_ipc_paths.add(path)
        _register_atexit()
    return actual


def connect_zmq_socket(sock: zmq.Socket, address: str) -> None:
    """Connect `sock` to `address`; a tcp:// one speaks CURVE when SHOAL_ENGINE_SECRET is
    set (`secure_socket`), like the socket bound there."""
    secure_socket(sock, address, is_server=False)
    sock.connect(address)


def secure_socket(sock: zmq.Socket, address: str, is_server: bool) -> None:
    """With SHOAL_ENGINE_SECRET set, make a `tcp://` socket speak ZMQ CURVE (encrypted): the
    binding side as the server, under a key pair derived from the secret; a connecting side
    needs the server's public key, which only the secret yields, and gets a fresh key pair
    of its own. A peer without the secret cannot complete the handshake, so it can neither
    send to nor read from the socket. IPC sockets (one host, a 0700 directory) and runs
    without the secret are left as they are. Call before bind / connect."""
    secret = envs.ENVS.engine_secret
    if not secret or not address.startswith("tcp://"):
        return
    import zmq

    server_public, server_secret = _curve_server_keys(secret)
    if is_server:
        sock.curve_secretkey = server_secret
        sock.curve_publickey = server_public
        sock.curve_server = True
    else:
        public, secret_key = zmq.curve_keypair()
        sock.curve_serverkey = server_public
        sock.curve_publickey = public
        sock.curve_secretkey = secret_key


def _curve_server_keys(secret: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 CURVE keys of every engine-socket server, from the shared secret."""
    import hashlib

    import zmq
    from zmq.utils import z85

    raw = hashlib.blake2b(secret.encode(), digest_size=32, person=b"shoal-engines").digest()
    secret_key = z85.encode(raw)
    return zmq.curve_public(secret_key), secret_key


def ipc_path(address: str) -> str | None:
    """The filesystem path of an `ipc://` address; None for other transports and for
    abstract-namespace (`ipc://@name`) addresses, which have no file."""
    if not address.startswith("ipc://"):
        return None
    path = address[len("ipc://") :]
    if not path or path.startswith("@") or path == "*":
        return None
    return path


def unlink_ipc_address(address: str) -> None:
    """Remove the socket file of an `ipc://` address; no-op for anything else or a missing
    file. Safe to call more than once and from any process."""
    path = ipc_path(address)
    if path is None:
        return
    with _lock:
        _owned_ipc_paths.discard(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def cleanup_owned_ipc_paths() -> None:
    """Unlink every IPC socket file this process bound through `bind_zmq_socket`."""
    with _lock:
        paths = list(_owned_ipc_paths)
        _owned_ipc_paths.clear()
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _at_exit() -> None:
    cleanup_owned_ipc_paths()
    remove_ipc_run_dir()


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(_at_exit)
