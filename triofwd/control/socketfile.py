"""The control socket's file: a Unix socket at a path, mode 0600 from the moment it has its
name, replacing a stale one, never a live one; and who is at the other end of a connection.

Who may talk to the daemon is decided twice: the file's mode, and each peer's SO_PEERCRED
uid (ours or root's; the server refuses anyone else before reading a byte).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Iterator

import trio

from .._errors import ListenError, listen_error

__all__ = ["bind_control_socket", "default_control_path", "peer_credentials"]

log = logging.getLogger("triofwd.control")

LISTEN_BACKLOG = 16
# sun_path is 108 bytes on Linux, including the terminating NUL (unix(7)).
SUN_PATH_MAX = 107
# struct ucred {pid_t pid; uid_t uid; gid_t gid;} (unix(7), SO_PEERCRED)
_UCRED = struct.Struct("iII")


def default_control_path() -> str:
    """Where the inspector looks when no -s is given.

    $TRIOFWD_CONTROL if set; /run/triofwd/control.sock for root (systemd's
    RuntimeDirectory=triofwd); else $XDG_RUNTIME_DIR/triofwd.sock (or
    /run/user/UID/triofwd.sock without XDG_RUNTIME_DIR).
    """
    if env := os.environ.get("TRIOFWD_CONTROL"):
        return env
    if os.geteuid() == 0:
        return "/run/triofwd/control.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    return os.path.join(runtime, "triofwd.sock")


@contextlib.contextmanager
def bind_control_socket(path: str | os.PathLike[str]) -> Iterator[trio.SocketListener]:
    """A listening Unix socket at `path`, mode 0600 from the moment the name exists.

    bind() creates the file with the umask's mode, and changing the umask is
    process-wide (it would race with files other threads create). So the socket is
    bound in a fresh 0700 directory next to `path`, where no one else can reach it,
    chmod-ed to 0600 there, and rename(2)-d into place, which is atomic and replaces a
    stale socket left by a crashed run. A socket that a live process still answers on,
    or a file that is not a socket, is never replaced: ListenError.

    On exit the socket is closed and the file removed, if it is still ours.
    """
    path = os.path.abspath(os.fspath(path))
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ListenError(errno.ENAMETOOLONG, f"control socket path is longer than {SUN_PATH_MAX} bytes: {path}")
    _check_previous(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _mapped_bind_errors(path):
            private = tempfile.mkdtemp(prefix=".triofwd-", dir=os.path.dirname(path))
            try:
                scratch = os.path.join(private, "s")
                sock.bind(scratch)
                os.chmod(scratch, 0o600)
                sock.listen(LISTEN_BACKLOG)
                os.rename(scratch, path)
            finally:
                with contextlib.suppress(OSError):
                    os.rmdir(private)
            identity = _identity(path)
    except BaseException:
        sock.close()
        raise
    log.info("control socket at %s", path, extra={"fields": {"control": path}})
    try:
        yield trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            if _identity(path) == identity:  # not a socket a later daemon put there
                os.unlink(path)


def _identity(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def _mapped_bind_errors(path: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise listen_error(exc, f"create control socket {path}") from None


def _check_previous(path: str) -> None:
    """Refuse to replace a file that is not a socket, or a socket a live process answers on."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise listen_error(exc, f"create control socket {path}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(errno.EEXIST, f"cannot create control socket {path}: a file that is not a socket is in the way")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a live socket with a full backlog answers EAGAIN, not a wait
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            log.info("replacing stale control socket %s", path)
            return
        except BlockingIOError:
            pass
        except OSError as exc:
            raise listen_error(exc, f"create control socket {path}") from None
    raise ListenError(errno.EADDRINUSE, f"cannot create control socket {path}: another process is serving it")


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
