"""CPU step processes forked from a warm interpreter (modelfactory.core.forkserver): the same process a
fresh start would give, errors and crashes reported the same way, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from modelfactory.core.errors import SpecError, WorkerError
from modelfactory.core.forkserver import close_all
from modelfactory.core.isolation import run_isolated
from modelfactory.testing.env import settings_env
from modelfactory.testing.prefect_server import step_processes, wait_for

HERE = Path(__file__).parent


# --------------------------------------------------------------------------- step functions (run in the child)
def probe(*, tag: str) -> dict:
    import numpy

    return {"tag": tag, "pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "path0": sys.path[0],
            "argv": sys.argv[1:], "env": os.environ.get("MF_TEST_FORK"),
            "test": os.environ.get("PYTEST_CURRENT_TEST"), "worker": os.environ.get("MODELFACTORY_WORKER"),
            "work_dir": os.environ.get("MODELFACTORY_WORK_DIR"),
            "torch_preloaded": "transformers" in sys.modules, "numpy_draw": float(numpy.random.random())}


def threads() -> dict:
    import torch

    return {"torch": torch.get_num_threads(), "ppid": os.getppid()}


def memory() -> dict:
    """The step's resident memory after the preloaded imports, and what loading a small model adds to it."""
    import importlib

    from modelfactory.benchmark.memory import MemoryProbe
    from modelfactory.core.forkserver_main import PRELOAD

    for name in PRELOAD:
        importlib.import_module(name)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    probe = MemoryProbe(device="cpu")
    from transformers import AutoModelForCausalLM, LlamaConfig

    AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, vocab_size=512))
    return {"rss_file_kb": int(status["RssFile"].split()[0]), "load_bytes": probe.current(), "ppid": os.getppid()}


def mark_at_exit(*, path: str) -> None:
    import atexit

    atexit.register(Path(path).write_text, "exit handlers ran")


def refuse() -> None:
    raise SpecError("a spec error raised in the step process")


def crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_forever() -> None:
    print("[mf] sleeping", flush=True)
    time.sleep(600)


def _run(target: str, tmp_path: Path, *, warm: bool = True, env: dict | None = None, **kwargs):
    return run_isolated(f"test_forkserver:{target}", kwargs=kwargs, log_path=tmp_path / "step.log", cwd=HERE,
                        env=env, warm=warm)


@pytest.fixture(scope="module", autouse=True)
def _servers_of_this_module():
    """The tests share this process's servers (one per environment: each start imports torch); none is left."""
    close_all()
    yield
    close_all()


ENV = {"MF_TEST_FORK": "a"}


def test_a_warm_step_sees_what_a_fresh_one_sees(tmp_path):
    fresh = _run("probe", tmp_path, warm=False, env=ENV, tag="fresh")
    warm = _run("probe", tmp_path, env=ENV, tag="warm")
    assert fresh["ppid"] == os.getpid() != warm["ppid"]  # forked by the server, not by us
    assert not fresh["torch_preloaded"] and warm["torch_preloaded"]
    for key in ("cwd", "path0", "env", "worker"):
        assert warm[key] == fresh[key], key
    assert warm["argv"][0] == fresh["argv"][0] == "test_forkserver:probe"
    assert warm["cwd"] == str(HERE)


def test_warm_steps_share_one_server_per_environment_and_draw_fresh_random_numbers(tmp_path):
    first = _run("probe", tmp_path, env=ENV, tag="1")
    second = _run("probe", tmp_path, env={**ENV, "PYTEST_CURRENT_TEST": "another test",
                                          "MODELFACTORY_WORK_DIR": str(tmp_path / "work")}, tag="2")
    other = _run("probe", tmp_path, env={"MF_TEST_FORK": "b"}, tag="3")
    assert first["ppid"] == second["ppid"] != other["ppid"]  # pytest's test name, our settings pick no server ...
    assert second["test"] == "another test" and first["test"] == os.environ["PYTEST_CURRENT_TEST"]  # ... each has its own
    assert second["work_dir"] == str(tmp_path / "work") and first["work_dir"] == os.environ.get("MODELFACTORY_WORK_DIR")
    assert first["pid"] != second["pid"]
    assert first["numpy_draw"] != second["numpy_draw"]  # reseeded per process, as a fresh start is
    assert other["env"] == "b"


def test_the_server_imports_nothing_that_reads_our_settings_or_prefects():
    """Why MODELFACTORY_* and PREFECT_* variables pick no server (forkserver.VOLATILE_PREFIXES): after its preload
    the server holds no module of the factory's but its own packages, and none of Prefect's."""
    code = ("import importlib, json, sys\nfrom modelfactory.core.forkserver_main import PRELOAD\n"
            "for name in PRELOAD: importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('modelfactory', 'prefect'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(loaded) == ["modelfactory", "modelfactory.core", "modelfactory.core.forkserver_main"]


def test_without_a_thread_count_a_warm_step_gets_the_default_one_as_a_fresh_one_does(tmp_path, monkeypatch):
    """`make test` sets OMP_NUM_THREADS=1; without it torch would start an OpenMP team while importing, which a
    forked child must not inherit: the server imports with one thread, each step takes the default back."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fresh = _run("threads", tmp_path, warm=False, env=ENV)
    warm = _run("threads", tmp_path, env=ENV)
    assert warm["ppid"] != os.getpid()  # forked: the server did not refuse
    assert warm["torch"] == fresh["torch"] == len(os.sched_getaffinity(0))


def test_a_warm_step_starts_with_the_memory_a_fresh_one_has(tmp_path):
    """fork() leaves out the library pages the server mapped from files; the step maps them again, or its
    RSS grows by the library code it touches and CPU memory measurements read ~20 MB high."""
    fresh = _run("memory", tmp_path, warm=False, env=ENV)
    warm = _run("memory", tmp_path, env=ENV)
    assert warm["ppid"] != os.getpid()
    assert warm["rss_file_kb"] >= 0.9 * fresh["rss_file_kb"], (warm, fresh)  # without: ~10 %
    assert abs(warm["load_bytes"] - fresh["load_bytes"]) < 4 * 2**20, (warm, fresh)


def test_a_warm_step_runs_its_exit_handlers_as_a_fresh_one_does(tmp_path):
    _run("mark_at_exit", tmp_path, env=ENV, path=str(tmp_path / "mark"))
    assert (tmp_path / "mark").read_text() == "exit handlers ran"


def test_errors_and_crashes_come_back_as_from_a_fresh_process(tmp_path):
    with pytest.raises(SpecError, match="a spec error raised in the step process"):
        _run("refuse", tmp_path, env=ENV)
    with pytest.raises(WorkerError, match="exited with code -9 without a result"):
        _run("crash", tmp_path, env=ENV)
    assert "SpecError" in (tmp_path / "step.log").read_text()  # the traceback went to the step's log
    assert _run("probe", tmp_path, env=ENV, tag="after")["tag"] == "after"  # the server outlived its crashed child


def test_turned_off_every_step_starts_fresh(tmp_path):
    with settings_env(MODELFACTORY_FORK_SERVER="false"):
        seen = _run("probe", tmp_path, tag="off")
    assert seen["ppid"] == os.getpid() and not seen["torch_preloaded"]


def test_when_the_caller_dies_the_server_and_its_steps_die_with_it(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from modelfactory.core.isolation import run_isolated
        run_isolated("test_forkserver:sleep_forever", kwargs={{}}, log_path=Path({str(tmp_path / 'c.log')!r}),
                     cwd=Path({str(HERE)!r}), warm=True)
    """)
    caller = subprocess.Popen([sys.executable, "-c", script], cwd=HERE, start_new_session=True)
    try:
        steps = wait_for("the warm step to start", lambda: step_processes(caller.pid), timeout=120)
        below = psutil.Process(caller.pid).children(recursive=True)
        assert len(below) == 2 and steps[0] in below, [p.cmdline() for p in below]  # the server and its step
        caller.kill()
        caller.wait()
        _gone, alive = psutil.wait_procs(below, timeout=20)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if caller.poll() is None:
            os.killpg(caller.pid, signal.SIGKILL)
