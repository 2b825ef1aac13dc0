"""Real Prefect processes for tests: a ``prefect server`` and the GPU host's worker script.

Everything runs in its own session (process group) with its own ``PREFECT_HOME``, logs to a
file whose tail goes into every failure message, and is stopped by process group: SIGTERM,
a bounded wait, then SIGKILL of the whole process tree (flow-run processes included).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

from modelfactory.testing.env import REPO, free_port

BIN = Path(sys.executable).parent
START_WORKERS = REPO / "infra" / "gpu-host" / "start-workers.sh"
#: Prefect/factory variables a child must not inherit from the test process.
_DROP = ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILE", "PREFECT_API_KEY", "MODELFACTORY_GPU_DEPLOYMENT")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_CLI_COLORS": "false",
                "PREFECT_CLI_WRAP_LINES": "false", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"})
    env.update(extra)
    return env


def wait_for(what: str, check: Callable[[], Any], *, timeout: float, every: float = 0.5,
              diagnostics: Callable[[], str] = lambda: "") -> Any:
    """Poll *check* until it returns something truthy; fail after *timeout* s with *diagnostics*."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_error = exc
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                         + (f" (last error: {last_error!r})" if last_error else "") + "\n" + diagnostics())


def tail(path: Path, lines: int = 60) -> str:
    if not path.is_file():
        return f"({path} does not exist)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- last {len(text)} lines of {path} ---\n" + "\n".join(text)


def step_processes(root_pid: int | None = None) -> list[psutil.Process]:
    """The isolated step processes under *root_pid* (default: this process):
    ``python -m modelfactory.core.isolated_child`` processes."""
    found = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if "modelfactory.core.isolated_child" in proc.cmdline():
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def kill_tree(root_pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send *sig* to *root_pid* and every descendant (collected first: orphans are reparented)."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=15)
    return [p.pid for p in procs]


class Background:
    """One background process in its own session, output to *log*."""

    def __init__(self, name: str, cmd: list[str], *, env: dict[str, str], log: Path, cwd: Path = REPO) -> None:
        self.name, self.cmd, self.env, self.log, self.cwd = name, cmd, env, log, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            out.write(f"\n===== start {self.name}: {' '.join(self.cmd)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill_hard(self) -> list[int]:
        """SIGKILL the process and all its descendants at once (a host dying), as a test of crash handling."""
        assert self.proc is not None
        pids = kill_tree(self.proc.pid)
        self.proc.wait(timeout=15)
        return pids

    def stop(self, grace: float = 20) -> None:
        """SIGTERM its process group, then SIGKILL whatever outlived *grace* s; how it went ends the log."""
        if self.proc is None:
            return
        began = time.monotonic()
        killed = self._stop(grace)
        with open(self.log, "a") as out:
            out.write(f"\n===== stopped {self.name} in {time.monotonic() - began:.1f} s"
                      f"{f' (SIGKILL for {killed})' if killed else ''}\n")

    def _stop(self, grace: float) -> list[str]:
        assert self.proc is not None
        descendants: list[psutil.Process] = []
        try:
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        for proc in [psutil.Process(self.proc.pid)] if self.proc.poll() is None else []:
            descendants.append(proc)
        killed = []
        for proc in descendants:  # whatever outlived the grace period (flow-run processes have own sessions)
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                name = " ".join(proc.cmdline()[:4])[:80]
                proc.kill()
                killed.append(name)
            except psutil.Error:
                pass
        psutil.wait_procs(descendants, timeout=15)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        return killed

    def tail(self, lines: int = 60) -> str:
        return tail(self.log, lines)


class PrefectServer(Background):
    """``prefect server start`` on a free port, SQLite under its own ``PREFECT_HOME``; *ui*: serve the UI too."""

    def __init__(self, home: Path, *, ui: bool = False) -> None:
        self.port = free_port()
        self.home = home
        super().__init__("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                            "--port", str(self.port)],
                         env=child_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED=str(ui).lower(),
                                       PREFECT_UI_API_URL=f"http://127.0.0.1:{self.port}/api",  # what the UI calls
                                       PREFECT_SERVER_LOGGING_LEVEL="WARNING"),
                         log=home / "server.log")

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def healthy(self) -> bool:
        if not self.alive():
            raise AssertionError(f"prefect server exited with {self.proc.returncode}\n{self.tail()}")
        return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200

    def start_and_wait(self, timeout: float = 90) -> None:
        self.start()
        wait_for("the Prefect server's /api/health", self.healthy, timeout=timeout, diagnostics=self.tail)


class GpuHostWorkers(Background):
    """``infra/gpu-host/start-workers.sh``: the GPU host's workers, as an operator starts them."""

    def __init__(self, server: PrefectServer, home: Path, *, gpu_ids: str = "0", **env: str) -> None:
        self.server, self.gpu_ids, self.logs = server, gpu_ids, home / "logs"
        super().__init__("gpu-workers", ["bash", str(START_WORKERS)],
                         env=child_env(PREFECT_API_URL=server.api_url, PREFECT_HOME=str(home),
                                       PREFECT=str(BIN / "prefect"), MODELFACTORY_GPU_IDS=gpu_ids,
                                       MODELFACTORY_SOURCE_DIR=str(REPO), WORKER_LOG_DIR=str(home / "logs"),
                                       PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1",
                                       # flow runs beat every 30 s: what the zombie automation counts on
                                       **{"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", **env}),
                         log=home / "start-workers.log")

    def worker_logs(self, lines: int = 80) -> str:
        files = sorted(self.logs.glob("*.log")) if self.logs.is_dir() else []
        return "\n".join([self.tail(20), *(tail(f, lines) for f in files)])

    def online_workers(self, pool: str = "gpu", since: datetime | None = None) -> list[str]:
        """Workers of *pool* that are ONLINE (and sent a heartbeat after *since*)."""
        response = httpx.post(f"{self.server.api_url}/work_pools/{pool}/workers/filter", json={}, timeout=5)
        response.raise_for_status()
        return [w["name"] for w in response.json() if w["status"] == "ONLINE" and (
            since is None or datetime.fromisoformat(w["last_heartbeat_time"].replace("Z", "+00:00")) > since)]

    def start_and_wait(self, timeout: float = 90) -> None:
        since = datetime.now(UTC)  # a killed worker of the same name still looks ONLINE for a while
        self.start()
        expected = {f"gpu-{socket.gethostname().split('.')[0]}-{gpu}" for gpu in self.gpu_ids.split(",")}

        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"start-workers.sh exited with {self.proc.returncode}\n{self.worker_logs()}")
            return expected <= set(self.online_workers(since=since))

        wait_for(f"workers {sorted(expected)} online", ready, timeout=timeout, diagnostics=self.worker_logs)


_Started = TypeVar("_Started", PrefectServer, GpuHostWorkers)


@contextmanager
def started(process: _Started) -> Iterator[_Started]:
    """*process* started and ready inside the block; stopped after it (also when it never became ready)."""
    try:
        process.start_and_wait()
        yield process
    finally:
        process.stop()


@contextmanager
def prefect_api(server: PrefectServer) -> Iterator[PrefectServer]:
    """Inside the block this process's Prefect calls go to *server*; on the way out its run logs and events
    are sent while the server is still up (else Prefect retries them at exit, against a stopped server)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        try:
            yield server
        finally:
            APILogWorker.drain_all(timeout=30, at_exit=False)
            EventsWorker.drain_all(timeout=30, at_exit=False)


def api(server: PrefectServer, method: str, path: str, **body: Any) -> Any:
    """One Prefect REST call to *server*: the JSON answer (``None`` when empty); an ``AssertionError``
    naming the call on an HTTP error.

    A test's server shares 2 cores with the suite, and under load its SQLite answers 503 or not within
    the timeout: both are retried, as Prefect's own client does, for calls that may be repeated (reads,
    filters, PATCH, PUT, DELETE; a DELETE whose timed-out try went through finds nothing the next time).
    """
    repeatable = method != "POST" or path.endswith(("/filter", "/count"))
    for attempt in range(5):
        try:
            response = httpx.request(method, f"{server.api_url}{path}",
                                     json=body or ({} if method == "POST" else None), timeout=30)
        except httpx.TimeoutException:
            if not repeatable or attempt == 4:
                raise
        else:
            if response.status_code != 503:
                break
        time.sleep(1 + attempt)
    if method == "DELETE" and attempt and response.status_code == 404:
        return None
    assert response.is_success, f"{method} {path}: {response.status_code} {response.text[:2000]}"
    return response.json() if response.content else None
