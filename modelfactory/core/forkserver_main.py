"""The fork server's own process: ``python -m modelfactory.core.forkserver_main FD``, or for scripts that
must run without factory code, ``python -I /path/to/forkserver_main.py FD`` (then nothing of the factory is
imported: this module's top level is the standard library only, and ``-I`` keeps the factory off ``sys.path``).

It imports the heavy libraries once (:data:`PRELOAD`), says whether it is safe to fork (no thread
other than the allocator's), then serves requests on the socket *FD* (a ``SOCK_SEQPACKET`` pair with
:mod:`modelfactory.core.forkserver`), one JSON message each:

- ``{"op": "fork", "target", "in", "out", "env", "cwd"}`` plus one file descriptor (the step's output pipe):
  fork a step process that runs :func:`modelfactory.core.isolated_child.main`; reply ``{"pid"}``;
- ``{"op": "fork", "script", "args", "env", "cwd"}`` plus two file descriptors (stdout and stderr pipes):
  fork a process that runs the file *script* as ``__main__`` with *args*, as ``python SCRIPT ARGS...``
  would, in a session of its own (the caller kills it by process group); reply ``{"pid"}``;
- ``{"op": "wait", "pid"}``: reap that process; reply ``{"code"}`` (negative: killed by that signal).

When the client's end closes (its process died or it is done), every step process still running
is killed and the server exits.

A step process starts with the memory a fresh one would have after the same imports: ``fork()`` copies
the anonymous pages, but not the library pages the server had mapped from files (torch's code, ~200 MB),
so each step maps those again first (:func:`_resident_file_pages`, :func:`_map_again`). Without that, a
step's RSS would grow by whatever library code it touches, and a CPU memory measurement in it
(``modelfactory.benchmark.memory``) would read higher than in a fresh process.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import importlib
import json
import os
import runpy
import signal
import socket
import sys
import traceback

#: What every CPU step imports first: ~5 s of CPU on the project's 2-core machine, paid once here.
#: Not GPTQModel: importing it starts thread pools, and threads do not survive a fork.
PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
           "transformers.models.auto.tokenization_auto", "transformers.generation.utils", "safetensors.torch")
#: Threads that may exist at fork time: jemalloc (loaded by a dependency) restarts its own after a fork.
FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd"})
MAX_MESSAGE = 1 << 20
#: Set (by :mod:`modelfactory.core.forkserver`) when this server imported with one OpenMP thread although
#: the steps' environment names no count: each step process then takes the default count, all usable CPUs,
#: as a fresh torch would (numpy's own BLAS keeps one thread; the steps compute in torch).
RESTORE_THREADS_ENV = "MODELFACTORY_FORKSERVER_RESTORE_THREADS"
PAGE = os.sysconf("SC_PAGE_SIZE")
MADV_POPULATE_READ = 22  # Linux >= 5.14: map these pages (from the page cache), as read faults would


def _resident_file_pages() -> list[tuple[int, int]]:
    """The address ranges of this process's file-backed mappings whose pages are mapped now.

    Read from ``/proc/self/pagemap`` (bit 63: present), which a process may read for itself. Written by
    hand because no library offers it; these are the pages a forked child lacks (the kernel copies a
    file mapping's page table only where the parent has written to it).
    """
    runs: list[tuple[int, int]] = []
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for line in maps:
            fields = line.split(maxsplit=5)
            path = fields[5].strip() if len(fields) == 6 else ""
            if not path.startswith("/") or path.startswith("/dev/") or not fields[1].startswith("r"):
                continue  # anonymous, [heap]/[stack]/[vdso], a device, or not readable
            start, end = (int(x, 16) for x in fields[0].split("-"))
            pagemap.seek(start // PAGE * 8)
            entries = memoryview(pagemap.read((end - start) // PAGE * 8)).cast("Q")
            run_start = None
            for i, entry in enumerate(entries):
                if entry >> 63 and run_start is None:
                    run_start = start + i * PAGE
                elif not entry >> 63 and run_start is not None:
                    runs.append((run_start, start + i * PAGE))
                    run_start = None
            if run_start is not None:
                runs.append((run_start, end))
    return runs


def _map_again(runs: list[tuple[int, int]]) -> None:
    """In a forked process: map the server's resident file pages (:func:`_resident_file_pages`)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for start, end in runs:
        if libc.madvise(start, end - start, MADV_POPULATE_READ) != 0:
            for address in range(start, end, PAGE):  # an older kernel: one read per page does the same
                ctypes.c_char.from_address(address).value


def _other_threads() -> list[str]:
    """Names of this process's threads other than the main one."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        if tid != str(os.getpid()):
            try:
                names.append(open(f"/proc/self/task/{tid}/comm").read().strip())
            except OSError:
                pass
    return names


def _send(sock: socket.socket, message: dict) -> None:
    sock.send(json.dumps(message).encode())


def _run_child(request: dict, fds: list[int], resident: list[tuple[int, int]]) -> None:
    """In the forked process: the output goes to *fds* (stdout, and stderr if a second one is given);
    run the step like a fresh ``python -m modelfactory.core.isolated_child`` would, or the script like
    ``python SCRIPT ARGS...``, then exit (never returns)."""
    code = 1
    try:
        _map_again(resident)
        os.dup2(fds[0], 1)
        os.dup2(fds[-1], 2)
        for fd in set(fds):
            os.close(fd)
        restore_threads = os.environ.get(RESTORE_THREADS_ENV) == "1"
        if request.get("env") is not None:  # the server's own, but for variables that pick no server
            os.environ.clear()
            os.environ.update(request["env"])
        if restore_threads:  # imported with one thread: take the count a fresh process would
            sys.modules["torch"].set_num_threads(len(os.sched_getaffinity(0)))
        if request.get("cwd"):
            os.chdir(request["cwd"])
        if "numpy" in sys.modules:  # a fresh interpreter seeds numpy's global generator from the OS
            sys.modules["numpy"].random.seed()
        code = _run_script(request) if "script" in request else _run_step(request)
    except BaseException:  # noqa: BLE001 - anything here ends this process, reported like a crash
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # what a normal exit runs (temporary folders, library shutdown hooks)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _run_step(request: dict) -> int:
    if request.get("cwd"):
        sys.path[0] = os.getcwd()  # as ``python -m`` started there would have it
    args = [request["target"], request["in"], request["out"]]
    sys.argv = ["-m", *args]
    from modelfactory.core import isolated_child

    return isolated_child.main(args)


def _run_script(request: dict) -> int:
    os.setsid()  # as a process started with ``start_new_session``: killed with whatever it starts
    sys.argv = [request["script"], *request["args"]]
    try:
        runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as exc:  # what the interpreter makes of ``sys.exit(code)``
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return 0


def serve(sock: socket.socket, *, resident: list[tuple[int, int]]) -> None:
    children: set[int] = set()
    try:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 2)
            except ConnectionError:
                return
            if not data:
                return  # the client is gone
            request = json.loads(data)
            if request["op"] == "fork":
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    sock.close()
                    _run_child(request, fds, resident)
                for fd in fds:
                    os.close(fd)
                children.add(pid)
                _send(sock, {"pid": pid})
            elif request["op"] == "wait":
                pid = request["pid"]
                try:
                    _, status = os.waitpid(pid, 0)
                    code = os.waitstatus_to_exitcode(status)
                except ChildProcessError:
                    code = None
                children.discard(pid)
                _send(sock, {"code": code})
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    try:
        for name in PRELOAD:
            importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - reported to the client, which then spawns fresh processes
        _send(sock, {"ready": False, "why": f"preloading failed: {type(exc).__name__}: {exc}"})
        return 1
    unsafe = [name for name in _other_threads() if name not in FORK_SAFE_THREADS]
    if unsafe:
        _send(sock, {"ready": False, "why": f"threads running after the preload: {unsafe}"})
        return 1
    # What the imports made lives as long as the process: keep the step processes' collections (GPTQModel
    # runs one per layer) off those ~0.5 M objects and their pages shared (the gc module's advice for fork).
    gc.freeze()
    try:
        resident = _resident_file_pages()
    except OSError as exc:  # no /proc/self/pagemap (some sandboxes): steps would read more memory than fresh
        _send(sock, {"ready": False, "why": f"cannot read which library pages are mapped: {exc}"})
        return 1
    _send(sock, {"ready": True, "pid": os.getpid()})
    serve(sock, resident=resident)
    os._exit(0)  # nothing to flush or clean up: skip tearing down torch and transformers (~1 s of CPU)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
