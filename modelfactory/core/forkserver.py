"""CPU step processes forked from a warm interpreter instead of started cold.

Why: every isolated step (:mod:`modelfactory.core.isolation`) is a new Python process that first imports
torch and transformers: about 5 s of CPU on a 2-core machine, more than the whole benchmark of a small
model. A fork server (:mod:`modelfactory.core.forkserver_main`) imports them once; each step process is
forked from it. The step still runs in its own process, with the same environment, working directory
and arguments as a fresh one, and ends with it: nothing of one step is left for the next.

Why by hand: :mod:`multiprocessing`'s ``forkserver`` start method preloads modules too, but it is one
server per process, started with the environment of that moment, and its children cannot get a pipe as
their stdout. Steps carry their own environment (libraries read some of it at import time) and stream
their output line by line. So there is one server per distinct environment here (variables that no
preloaded library reads, :data:`VOLATILE_PREFIXES`, aside), and the step's pipe is passed to the server
with the request (``SCM_RIGHTS``).

CPU only (:func:`modelfactory.core.devices.gpu_present`): a process that has imported torch may be forked
only while nothing has initialised CUDA, and on a GPU the import is noise next to the work. A forked
step maps the library pages its server had mapped first, so it starts with the RSS a fresh process has
and the benchmark's CPU memory numbers read the same either way. Turned off by
``MODELFACTORY_FORK_SERVER=false``. Where a server cannot start, steps start fresh processes.

A second kind of server runs scripts that must see no factory code (:func:`fork_script`: the
plain-transformers check, :mod:`modelfactory.benchmark.runnability`): it is started as ``python -I`` with
:mod:`~modelfactory.core.forkserver_main` by file path, so it imports the standard library, torch and
transformers, and nothing else; each script process is forked from it as ``python -I SCRIPT`` would start.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import IO

from modelfactory.core import forkserver_main
from modelfactory.core.forkserver_main import MAX_MESSAGE, RESTORE_THREADS_ENV
from modelfactory.core.log import get_logger

#: Idle servers kept (one per distinct step environment); one with a step process running is never closed.
MAX_IDLE_SERVERS = 2
READY_TIMEOUT_S = 300.0
#: Variables that no preloaded library reads at import time: they do not pick the server, and each step
#: process still gets its own value. pytest names the current test in one; the factory's own settings and
#: Prefect's are read by code that only the step imports (the server imports nothing of either).
VOLATILE = frozenset({"PYTEST_CURRENT_TEST"})
VOLATILE_PREFIXES = ("MODELFACTORY_", "PREFECT_")
THREADS_ENV = "OMP_NUM_THREADS"


class ForkServerUnavailable(RuntimeError):
    """The server could not start or is gone; the caller starts a fresh process instead."""


class ForkedProcess:
    """A process forked by a :class:`ForkServer`: what callers use of :class:`subprocess.Popen` (``stdout``
    and ``stderr`` as text, ``pid``, ``wait``, ``kill``, ``communicate``)."""

    def __init__(self, server: ForkServer, pid: int, stdout: IO[str], stderr: IO[str] | None = None) -> None:
        self._server, self.pid, self.stdout, self.stderr = server, pid, stdout, stderr
        self.returncode: int | None = None
        self._readers: list[tuple[threading.Thread, list[str]]] = []

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = self._server.wait(self.pid)
            _release(self._server)
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Read stdout and stderr to their end and wait, like :meth:`subprocess.Popen.communicate`: raises
        :class:`subprocess.TimeoutExpired` after *timeout* s (call again after killing it for the rest)."""
        if not self._readers:
            for stream in (self.stdout, self.stderr):
                chunks: list[str] = []
                reader = threading.Thread(target=_read_all, args=(stream, chunks), daemon=True)
                reader.start()
                self._readers.append((reader, chunks))
        for reader, _ in self._readers:
            reader.join(timeout)
            if reader.is_alive():
                raise subprocess.TimeoutExpired(f"forked process {self.pid}", timeout or 0)
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        self.wait()
        out, err = ("".join(chunks) for _, chunks in self._readers)
        return out, err

    def __enter__(self) -> ForkedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        self.wait()


def _read_all(stream: IO[str] | None, into: list[str]) -> None:
    if stream is not None:
        into.extend(stream)


class ForkServer:
    """One warm interpreter for one environment (:mod:`modelfactory.core.forkserver_main`); *isolated*: a
    ``python -I`` one that imports no factory code (for :func:`fork_script`)."""

    def __init__(self, env: dict[str, str], *, isolated: bool = False) -> None:
        self.env = env
        self.busy = 0
        self._lock = threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        self._stderr = tempfile.TemporaryFile()
        # With more than one OpenMP thread, importing torch starts a thread team, and a forked child of a
        # process that has one can hang in its first parallel region. So the server imports with one
        # thread, and each step process then takes the count a fresh one would have (forkserver_main).
        server_env = env if THREADS_ENV in env else {**env, THREADS_ENV: "1", RESTORE_THREADS_ENV: "1"}
        main = ["-I", str(Path(forkserver_main.__file__).resolve())] if isolated else [
            "-m", "modelfactory.core.forkserver_main"]
        with theirs:
            self._proc = subprocess.Popen(
                [sys.executable, *main, str(theirs.fileno())],
                env=server_env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self._stderr,
            )
        try:
            self._sock.settimeout(READY_TIMEOUT_S)
            reply = self._recv()
            self._sock.settimeout(None)
        except (OSError, ForkServerUnavailable) as exc:
            self.close()
            raise ForkServerUnavailable(f"the fork server did not start ({exc}); {self._stderr_tail()}") from exc
        if not reply.get("ready"):
            self.close()
            raise ForkServerUnavailable(f"the fork server cannot fork safely: {reply.get('why')}")

    def _recv(self) -> dict:
        data = self._sock.recv(MAX_MESSAGE)
        if not data:
            raise ForkServerUnavailable("the fork server exited")
        return json.loads(data)

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        except (OSError, ValueError):
            return "no output"
        return "last output: " + " | ".join(lines[-3:]) if lines else "no output"

    def spawn(self, request: dict, *, stderr: bool = False) -> ForkedProcess:
        """Fork a process for *request* (:mod:`~modelfactory.core.forkserver_main`'s ``fork`` op); its output
        comes back on a pipe (two with *stderr*: stdout and stderr apart)."""
        pipes = [os.pipe() for _ in range(2 if stderr else 1)]
        try:
            with self._lock:
                socket.send_fds(self._sock, [json.dumps({"op": "fork", **request}).encode()], [w for _, w in pipes])
                pid = self._recv()["pid"]
        except (OSError, ForkServerUnavailable) as exc:
            for read_fd, _ in pipes:
                os.close(read_fd)
            raise ForkServerUnavailable(f"the fork server is gone ({exc})") from exc
        finally:
            for _, write_fd in pipes:
                os.close(write_fd)
        streams = [open(read_fd, encoding="utf-8", errors="replace") for read_fd, _ in pipes]
        return ForkedProcess(self, pid, *streams)

    def wait(self, pid: int) -> int:
        """The exit code of a step process (negative: the signal that killed it); call once its output ended."""
        try:
            with self._lock:
                self._sock.send(json.dumps({"op": "wait", "pid": pid}).encode())
                code = self._recv()["code"]
        except (OSError, ForkServerUnavailable):
            code = None  # the server died, and its step processes with it
        return -signal.SIGKILL if code is None else code

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def close(self) -> None:
        """Close the socket: the server kills what still runs and exits."""
        self._sock.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()


_servers: OrderedDict[str, ForkServer] = OrderedDict()
_failed: set[str] = set()
_servers_lock = threading.Lock()


def _env_key(env: dict[str, str], *, isolated: bool = False) -> str:
    """Steps whose environments differ only in :data:`VOLATILE` and :data:`VOLATILE_PREFIXES` share a server
    (each gets its own environment exactly)."""
    kept = sorted((k, v) for k, v in env.items() if k not in VOLATILE and not k.startswith(VOLATILE_PREFIXES))
    return hashlib.sha256(json.dumps([isolated, kept]).encode()).hexdigest()


def _server_for(env: dict[str, str], *, isolated: bool = False) -> ForkServer | None:
    key = _env_key(env, isolated=isolated)
    with _servers_lock:
        server = _servers.get(key)
        if server is not None and not server.alive:
            del _servers[key]
            server = None
        if server is None:
            if key in _failed:
                return None
            try:
                server = ForkServer(env, isolated=isolated)
            except ForkServerUnavailable as exc:
                _failed.add(key)
                get_logger().warning(f"step processes start fresh: {exc}")
                return None
            _servers[key] = server
            idle = [k for k, s in _servers.items() if k != key and s.busy == 0]
            for old in idle[: max(0, len(_servers) - MAX_IDLE_SERVERS)]:
                _servers.pop(old).close()
        _servers.move_to_end(key)
        server.busy += 1
        return server


def fork_step(*, target: str, in_path: Path, out_path: Path, env: dict[str, str],
              cwd: Path | None) -> ForkedProcess | None:
    """A step process forked from the warm server for *env*, or None where that is not possible (the
    caller then starts a fresh interpreter)."""
    return _fork({"target": target, "in": str(in_path), "out": str(out_path), "env": env,
                  "cwd": str(cwd) if cwd else None}, env=env, isolated=False, stderr=False)


def fork_script(*, script: Path, args: list[str], env: dict[str, str], cwd: Path | None) -> ForkedProcess | None:
    """A process running *script* with *args* as ``python -I SCRIPT ARGS...`` would (no factory code
    imported, its own session), forked from an isolated warm server for *env*; None where that is not
    possible (the caller then starts ``python -I`` itself). Its stdout and stderr come back apart."""
    return _fork({"script": str(script), "args": list(args), "env": env, "cwd": str(cwd) if cwd else None},
                 env=env, isolated=True, stderr=True)


def _fork(request: dict, *, env: dict[str, str], isolated: bool, stderr: bool) -> ForkedProcess | None:
    server = _server_for(env, isolated=isolated)
    if server is None:
        return None
    try:
        return server.spawn(request, stderr=stderr)
    except ForkServerUnavailable as exc:
        _release(server)
        get_logger().warning(f"starting a fresh process: {exc}")
        return None


def _release(server: ForkServer) -> None:
    """One step process of *server* has ended (the server may be closed once none runs)."""
    with _servers_lock:
        server.busy -= 1


@atexit.register
def close_all() -> None:
    """Stop every server of this process."""
    with _servers_lock:
        while _servers:
            _servers.popitem()[1].close()
