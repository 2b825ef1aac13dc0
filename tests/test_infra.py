"""The deployment files, offline (no Docker engine, no cluster), and the GPU steps' compile caches.

- ``infra/docker/Dockerfile``: valid instructions, FROM first, a base image whose torch is inside
  pyproject's pin, every pin taken from pyproject (``infra/docker/pins.py``, run here for real),
  COPY sources inside the build context that ``.dockerignore`` lets through, non-root, an
  entrypoint that runs any command; its paths agree with the compose file and the k8s template.
- ``infra/compose.yaml``: parses, the ``gpu-worker`` service builds that Dockerfile and uses the
  image name the template defaults to.
- ``infra/k8s/gpu-base-job-template.json``: rendered with Prefect's own templating, every
  placeholder resolves and the job runs the worker image.
- ``modelfactory.core.caches``: every compile cache lands under ``MODELFACTORY_CACHE_DIR``, in an
  isolated step process (where the libraries themselves are asked) and in any other process.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "infra" / "compose.yaml"
K8S_TEMPLATE = REPO / "infra" / "k8s" / "gpu-base-job-template.json"
PINS = REPO / "infra" / "docker" / "pins.py"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
IMAGE = f"modelfactory-worker:{PYPROJECT['version']}"

#: Dockerfile instructions (https://docs.docker.com/reference/dockerfile/).
INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
                "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}


# --------------------------------------------------------------------------- small parsers
def parse_dockerfile(text: str) -> list[tuple[str, str, int]]:
    """``(INSTRUCTION, arguments, line)`` in order: comments and parser directives dropped,
    backslash continuations joined (comment lines inside a continuation are dropped, as Docker does)."""
    out: list[tuple[str, str, int]] = []
    current, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if not current:
            start = number
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.strip().partition(" ")
        out.append((keyword.upper(), args.strip(), start))
        current = ""
    assert not current, f"Dockerfile ends inside a continuation (line {start})"
    return out


def substitute(value: str, variables: dict[str, str]) -> str:
    """Docker's ``$NAME`` / ``${NAME}`` / ``${NAME:-default}`` substitution (the forms used here)."""
    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        got = variables.get(name, "")
        return got if got or default is None else default

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", one, value)


def dockerfile() -> dict:
    """The Dockerfile's instructions plus what the checks need: ARG defaults, ENV, the last USER, ..."""
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    for keyword, value, _ in instructions:
        if keyword == "ARG":
            name, _, default = value.partition("=")
            args[name] = substitute(default.strip('"'), args)
        elif keyword == "ENV":
            for item in shlex.split(value):
                assert "=" in item, f"ENV {value!r}: use the NAME=value form"
                name, _, val = item.partition("=")
                env[name] = substitute(val, {**args, **env})
    last = {keyword: value for keyword, value, _ in instructions}
    return {"instructions": instructions, "args": args, "env": env, "last": last}


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """``(negated, regex)`` per ``.dockerignore`` line: Go ``filepath.Match`` plus ``**``."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rx, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            else:
                rx += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
                i += 1
        rules.append((negated, re.compile(rx + r"\Z")))
    return rules


def excluded(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether *path* (relative to the context) stays out: the last rule matching it or a parent wins."""
    parts = path.strip("/").split("/")
    result = False
    for negated, rx in rules:
        if any(rx.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            result = not negated
    return result


def k8s_template() -> dict:
    return json.loads(K8S_TEMPLATE.read_text())


def k8s_container(template: dict) -> dict:
    (container,) = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    return container


def render_job(values: dict) -> dict:
    """The job configuration as a worker builds it: variable defaults, then *values*, applied with
    Prefect's own templating (``prefect.workers.base.BaseJobConfiguration.from_template_and_values``)."""
    from prefect.utilities.templating import apply_values

    template = k8s_template()
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    return apply_values(template["job_configuration"], {**defaults, **values})


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME}`` / ``${NAME:-default}`` interpolation (``$$`` is a literal ``$``)."""
    return substitute(value.replace("$$", "\0"), env).replace("\0", "$")


# --------------------------------------------------------------------------- Dockerfile
def test_dockerfile_parses_into_valid_instructions_with_from_first():
    df = dockerfile()
    keywords = [k for k, _, _ in df["instructions"]]
    unknown = [(k, line) for k, _, line in df["instructions"] if k not in INSTRUCTIONS]
    assert not unknown, f"not Dockerfile instructions: {unknown}"
    first = next(k for k in keywords if k != "ARG")
    assert first == "FROM", "only ARG may come before the first FROM"
    assert keywords.count("FROM") == 1
    # exec (JSON) form: signals reach the process, and Kubernetes' args append to the ENTRYPOINT
    for keyword in ("ENTRYPOINT", "CMD"):
        value = json.loads(df["last"][keyword])
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), keyword
    # every ${NAME} the instructions use is an ARG or ENV declared above it
    declared: set[str] = set()
    for keyword, value, line in df["instructions"]:
        used = set(re.findall(r"\$\{?(\w+)", value)) - declared
        assert not used, f"line {line}: {keyword} uses undeclared {sorted(used)}"
        if keyword == "ARG":
            declared.add(value.partition("=")[0])
        elif keyword == "ENV":
            declared |= {item.partition("=")[0] for item in shlex.split(value)}


def test_dockerfile_base_image_torch_and_version_are_inside_pyprojects_pins():
    from packaging.requirements import Requirement

    df = dockerfile()
    base = substitute(df["last"]["FROM"], df["args"])
    match = re.fullmatch(r"pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda(?P<cuda>[\d.]+)-cudnn\d+-devel", base)
    assert match, f"base image {base!r}: a CUDA PyTorch -devel image (GPTQModel JIT-compiles with nvcc)"
    (torch_pin,) = [Requirement(r) for r in PYPROJECT["dependencies"] if Requirement(r).name == "torch"]
    assert torch_pin.specifier.contains(match["torch"]), f"base torch {match['torch']} outside pyproject's {torch_pin}"
    assert df["args"]["MODELFACTORY_VERSION"] == PYPROJECT["version"]


def test_dockerfile_takes_every_pin_from_pyproject():
    """No version is written in the Dockerfile: pins.py feeds pip pyproject's requirements, keeps the
    base torch, and checks the result; the project itself goes in without resolving again."""
    from packaging.requirements import InvalidRequirement, Requirement

    df = dockerfile()
    names = {Requirement(r).name.lower().replace("_", "-") for r in PYPROJECT["dependencies"]}
    runs = [value for keyword, value, _ in df["instructions"] if keyword == "RUN"]
    pip_runs = [r for r in runs if "pip install" in r]
    for run in pip_runs:
        for token in shlex.split(run.replace("&&", " ; ")):
            try:
                req = Requirement(token)
            except InvalidRequirement:
                continue
            assert not (req.name.lower().replace("_", "-") in names and req.specifier), (
                f"the Dockerfile pins {token!r} itself: take it from pyproject.toml (pins.py)")
    install = " ".join(pip_runs)
    assert "pins.py constraints > /tmp/constraints.txt" in install and "-c /tmp/constraints.txt" in install
    assert "pins.py requirements > /tmp/requirements.txt" in install and "-r /tmp/requirements.txt" in install
    assert "pip install --no-deps ." in install
    last_pip = max(i for i, r in enumerate(runs) if "pip install" in r)
    assert "pins.py check" in runs[last_pip], "check the pins after the last install"


def test_pins_helper_reads_pyproject_and_checks_an_installed_environment(tmp_path):
    run = [sys.executable, str(PINS)]
    requirements = subprocess.run([*run, "requirements"], capture_output=True, text=True, check=True)
    assert requirements.stdout.split("\n")[:-1] == PYPROJECT["dependencies"]
    constraint = subprocess.run([*run, "constraints"], capture_output=True, text=True, check=True)
    import torch

    assert constraint.stdout.strip() == f"torch=={torch.__version__}"
    ok = subprocess.run([*run, "check"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr  # this environment is installed from the same pyproject

    # an environment outside a pin fails, naming the package, its version and the pin
    other = tmp_path / "pyproject.toml"
    other.write_text((REPO / "pyproject.toml").read_text().replace('"transformers==5.17.0"', '"transformers==4.0.0"')
                     .replace('"torch>=2.11,<2.14"', '"torch>=9"'))
    bad = subprocess.run([*run, "check", "--pyproject", str(other)], capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert "transformers 5.17.0 is installed, pyproject pins 'transformers==4.0.0'" in bad.stderr
    base = subprocess.run([*run, "constraints", "--pyproject", str(other)], capture_output=True, text=True,
                          check=False)
    assert base.returncode != 0 and "outside pyproject's pin 'torch>=9'" in base.stderr


def test_the_image_can_use_the_hopper_default_kernel_offline():
    """Machete (GPTQModel's default on Hopper) fetches CUTLASS at first use: the image brings the pinned sources
    (the digest GPTQModel checks) and points GPTQMODEL_CUTLASS_DIR at them; the GPU host script builds the kernels
    before its workers start."""
    from gptqmodel.utils import machete

    df = dockerfile()
    assert df["args"]["CUTLASS_VERSION"] == machete._CUTLASS_VERSION
    assert df["args"]["CUTLASS_SHA256"] == machete._CUTLASS_ARCHIVE_SHA256
    assert df["env"]["GPTQMODEL_CUTLASS_DIR"] == "/opt/cutlass"
    assert '"$MODELFACTORY" kernels prepare' in (REPO / "infra" / "gpu-host" / "start-workers.sh").read_text()


def test_dockerfile_copies_what_the_workers_need_and_dockerignore_lets_it_through():
    df = dockerfile()
    rules = dockerignore_rules()
    copied = []
    for keyword, value, line in df["instructions"]:
        if keyword == "ADD" and "https://" in value:
            # a remote source (CUTLASS for Machete) only pinned by its digest, so a build is reproducible
            flags = [word for word in shlex.split(value) if word.startswith("--")]
            assert any(f.startswith("--checksum=sha256:") for f in flags), f"line {line}: ADD of a URL needs --checksum"
            continue
        if keyword in ("COPY", "ADD"):
            *sources, _dest = shlex.split(value)
            for source in sources:
                assert not source.startswith("--"), f"line {line}: COPY flags are not used here"
                assert (REPO / source).exists(), f"line {line}: {source} is not in the build context"
                assert not excluded(source, rules), f"line {line}: .dockerignore excludes {source}"
                copied.append(source)
    # what `pip install .` builds (setuptools' packages + readme) and what runs from the checkout
    packages = {p.rstrip("*") for p in tomllib.loads((REPO / "pyproject.toml").read_text())
                ["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(copied) and {"pyproject.toml", "README.md", "deployments", "infra"} <= set(copied)
    for kept in ("modelfactory/core/caches.py", "flows/gpu_stage.py", "deployments/prefect.yaml",
                 "infra/gpu-host/start-workers.sh", "infra/docker/entrypoint.sh"):
        assert not excluded(kept, rules), kept
    for dropped in (".git/config", ".venv/bin/python", ".mf/cache/x", "tests/test_infra.py", "bench/gpu_bench.py",
                    "infra/.env", "modelfactory/core/__pycache__/x.pyc"):
        assert excluded(dropped, rules), f".dockerignore lets {dropped} into the build context"


def test_dockerfile_runs_non_root_with_an_entrypoint_that_runs_any_command(tmp_path):
    from modelfactory.gpu_pool import GPU_POOL

    df = dockerfile()
    user = substitute(df["last"]["USER"], df["args"])
    assert user.isdigit() and int(user) != 0, "a numeric non-root USER (Kubernetes runAsNonRoot checks it)"
    entrypoint = json.loads(df["last"]["ENTRYPOINT"])
    assert entrypoint[:2] == ["/usr/bin/tini", "--"]
    source_dir = df["env"]["MODELFACTORY_SOURCE_DIR"]
    assert df["last"]["WORKDIR"] == source_dir
    script = REPO / Path(entrypoint[2]).relative_to(source_dir)
    assert os.access(script, os.X_OK)
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    assert json.loads(df["last"]["CMD"]) == ["prefect", "worker", "start", "--pool", GPU_POOL, "--type", "process",
                                             "--limit", "1"]

    # the entrypoint runs its arguments (a Kubernetes job's flow-run command) after making the dirs
    env = {"PATH": os.environ["PATH"], "MODELFACTORY_HOME": str(tmp_path / "home"),
           "MODELFACTORY_CACHE_DIR": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf")}
    ran = subprocess.run([str(script), "sh", "-c", 'echo "ran $0 $1" in "$PWD"', "a", "b"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=False)
    assert ran.returncode == 0 and ran.stdout.startswith("ran a b in"), ran.stderr
    assert all((tmp_path / d).is_dir() for d in ("home", "cache", "hf"))
    # and stops with a clear message where it cannot make a folder (even as root: a file is in the way)
    (tmp_path / "a-file").write_text("")
    blocked = subprocess.run([str(script), "echo", "ran"], capture_output=True, text=True, check=False,
                             env={**env, "MODELFACTORY_CACHE_DIR": str(tmp_path / "a-file" / "cache")})
    assert blocked.returncode == 2 and not blocked.stdout
    assert f"{tmp_path / 'a-file' / 'cache'} is not a writable folder" in blocked.stderr


def test_dockerfile_sets_the_cache_dir_only_and_agrees_with_the_k8s_template():
    from modelfactory.core.caches import COMPILE_CACHES

    df = dockerfile()
    env = df["env"]
    assert not set(COMPILE_CACHES) & set(env), "the compile caches derive from MODELFACTORY_CACHE_DIR (core/caches.py)"
    template = k8s_template()
    container = k8s_container(template)
    pod_env = {e["name"]: e["value"] for e in container["env"]}
    assert not set(COMPILE_CACHES) & set(pod_env), "the compile caches derive from MODELFACTORY_CACHE_DIR"
    for name in ("MODELFACTORY_CACHE_DIR", "MODELFACTORY_HOME", "HF_HOME"):
        assert env[name] == pod_env[name], name
    assert template["variables"]["properties"]["source_dir"]["default"] == env["MODELFACTORY_SOURCE_DIR"]
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    uid = int(substitute(df["last"]["USER"], df["args"]))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == uid  # claims writable


# --------------------------------------------------------------------------- compose
def test_compose_gpu_worker_builds_the_dockerfile_and_runs_the_image():
    from modelfactory.core.caches import COMPILE_CACHES

    services = compose()["services"]
    worker = services["gpu-worker"]
    assert worker["profiles"] == ["gpu"], "the control plane comes up without GPUs"
    assert (COMPOSE.parent / worker["build"]["context"]).resolve() == REPO
    assert (REPO / worker["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert interpolate(worker["image"], {}) == IMAGE == render_job({"name": "x"})["job_manifest"]["spec"]["template"][
        "spec"]["containers"][0]["image"]
    assert interpolate(worker["image"], {"MODELFACTORY_WORKER_IMAGE": "r/w:2"}) == "r/w:2"
    assert (REPO / worker["command"][0]).is_file()  # relative to the image's WORKDIR, the checkout
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == "all"
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    env = worker["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert not set(COMPILE_CACHES) & set(env)

    def mounts(host_env: dict[str, str]) -> tuple[dict[str, str], str]:
        """``{target: source}`` of the worker's volumes and its work dir, with *host_env* set."""
        pairs = [interpolate(v, host_env).split(":") for v in worker["volumes"]]
        return {target: source for source, target in pairs}, interpolate(env["MODELFACTORY_WORK_DIR"], host_env)

    image_env = dockerfile()["env"]
    by_target, work_dir = mounts({})
    assert by_target[image_env["MODELFACTORY_CACHE_DIR"]] == "kernel-cache"  # the compile caches persist
    assert by_target[image_env["HF_HOME"]] == "hf-cache"
    assert work_dir == image_env["MODELFACTORY_HOME"] + "/work" and by_target[work_dir] == "modelfactory-work"
    assert {"kernel-cache", "hf-cache", "modelfactory-work"} <= set(compose()["volumes"])
    # a factory on this host: its work dir is mounted at the same path (step outputs are handed over as paths)
    by_target, work_dir = mounts({"MODELFACTORY_WORK_DIR": "/srv/mf/work"})
    assert work_dir == "/srv/mf/work" and by_target[work_dir] == "/srv/mf/work"


def test_compose_interpolations_are_well_formed():
    text = COMPOSE.read_text()
    for match in re.finditer(r"\$(?!\$)(\{[^}]*\}|\w*)", text):
        if text[match.start() - 1] == "$":
            continue  # $$: a literal $ for the container's shell
        assert re.fullmatch(r"\{[A-Z_][A-Z0-9_]*(:?-[^}]*)?\}", match.group(1)), f"compose: bad {match.group(0)!r}"


# --------------------------------------------------------------------------- Kubernetes template
def test_k8s_template_placeholders_are_variables_and_all_resolve_to_the_worker_image():
    from prefect.utilities.templating import find_placeholders

    template = k8s_template()
    properties = template["variables"]["properties"]
    names = {p.name for p in find_placeholders(template["job_configuration"])}
    assert names <= set(properties), f"placeholders without a variable: {names - set(properties)}"

    # what the worker supplies per flow run, on top of the pool's defaults
    job = render_job({"name": "gpu-stage-x", "command": "prefect flow-run execute", "env": {"A": "1"},
                      "labels": {"l": "v"}})
    assert "{{" not in json.dumps(job), "a placeholder stayed unresolved"
    container = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == IMAGE and container["args"] == "prefect flow-run execute"
    assert job["job_manifest"]["metadata"]["generateName"] == "gpu-stage-x-"
    assert {e["name"]: e["value"] for e in container["env"]}["MODELFACTORY_SOURCE_DIR"] == "/opt/modelfactory"

    # a pool or deployment sets its registry's image (job_variables.image)
    pushed = render_job({"name": "n", "image": "registry.example.com/modelfactory-worker:9"})
    assert pushed["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "registry.example.com/modelfactory-worker:9")


# --------------------------------------------------------------------------- devices
@pytest.mark.parametrize(("features", "expected"), [
    ({"avx2": True, "avx512_f": True}, "float32"),          # AVX2 / AVX-512 without BF16: torch emulates bf16
    ({"avx2": True, "avx512_bf16": True}, "bfloat16"),      # e.g. AMD Zen 4, Intel Cooper Lake
    ({"amx_bf16": True, "amx_tile": True}, "bfloat16"),     # Intel Sapphire Rapids
    ({"architecture": "arm64", "bf16": True}, "bfloat16"),  # e.g. AWS Graviton3
    ({"architecture": "arm64", "neon": True}, "float32"),
])
def test_auto_dtype_on_a_cpu_is_bfloat16_only_where_it_is_native(features, expected):
    from modelfactory.core.devices import cpu_dtype

    assert cpu_dtype(features) == expected
    for setting in ("bfloat16", "float32"):
        assert cpu_dtype(features, setting=setting) == setting


def test_auto_dtype_follows_the_setting_and_cuda_stays_float16(set_env):
    from modelfactory.core.devices import resolve_dtype

    for setting in ("bfloat16", "float32"):
        set_env(MODELFACTORY_CPU_DTYPE=setting)
        assert resolve_dtype("auto", "cpu") == setting and resolve_dtype("auto", "cuda") == "float16"
        assert resolve_dtype("float16", "cpu") == "float16"


# --------------------------------------------------------------------------- compile caches
@pytest.fixture
def cache_dir(tmp_path, set_env):
    cache = tmp_path / "mfcache"
    set_env(MODELFACTORY_CACHE_DIR=str(cache))
    return cache


def test_gpu_env_puts_every_compile_cache_under_the_cache_dir(cache_dir, monkeypatch):
    from modelfactory.core.caches import COMPILE_CACHES
    from modelfactory.core.devices import gpu_env

    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")  # one place: the cache dir decides
    env = gpu_env()
    assert {"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "GPTQMODEL_TORCH_EXTENSIONS_DIR", "GPTQMODEL_CACHE_DIR",
            "TORCH_EXTENSIONS_DIR", "CUDA_CACHE_PATH"} <= set(COMPILE_CACHES) <= set(env)
    for name in COMPILE_CACHES:
        assert Path(env[name]).is_relative_to(cache_dir), (name, env[name])
    assert len({env[name] for name in COMPILE_CACHES if name != "GPTQMODEL_CACHE_DIR"}) == len(COMPILE_CACHES) - 1

    # any other process with the same MODELFACTORY_CACHE_DIR (the next run on this host) gets the same
    shell = subprocess.run([sys.executable, "-m", "modelfactory.core.caches"], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    exported = dict(shlex.split(line)[1].split("=", 1) for line in shell.stdout.splitlines())
    assert exported == {name: env[name] for name in COMPILE_CACHES}


def library_cache_dirs() -> dict:
    """Step-process body: where the libraries themselves will put their caches in this process."""
    from gptqmodel.utils.cpp import default_torch_ops_build_root
    from gptqmodel.utils.machete import _gptqmodel_cache_dir
    from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir

    from modelfactory.core.caches import COMPILE_CACHES

    return {
        "env": {name: os.environ.get(name) for name in COMPILE_CACHES},
        "gptqmodel marlin build": str(default_torch_ops_build_root("marlin_fp16")),
        "gptqmodel downloads": str(_gptqmodel_cache_dir()),
        "inductor": cache_dir(),
        "triton (inductor's kernels)": triton_cache_dir(0),
    }


def test_isolated_step_processes_compile_into_the_cache_dir(cache_dir, tmp_path):
    """The quantize/benchmark step processes get gpu_env(); ask the libraries where they will write."""
    from modelfactory.core.devices import gpu_env
    from modelfactory.core.isolation import run_isolated

    env = gpu_env()
    seen = run_isolated(library_cache_dirs, kwargs={}, log_path=tmp_path / "child.log", env=env,
                        cwd=Path(__file__).parent)
    assert seen["env"] == {name: env[name] for name in seen["env"]}
    for what, path in seen.items():
        if what != "env":
            assert Path(path).is_relative_to(cache_dir), f"{what} would write to {path}, not under {cache_dir}"
    assert seen["gptqmodel marlin build"] == str(Path(env["GPTQMODEL_TORCH_EXTENSIONS_DIR"]) / "marlin_fp16")
    assert seen["inductor"] == env["TORCHINDUCTOR_CACHE_DIR"] and seen["triton (inductor's kernels)"] == env[
        "TRITON_CACHE_DIR"]


def test_the_gpu_steps_hand_gpu_env_to_their_step_processes():
    """quantize and benchmark start their isolated processes with gpu_env() (so with the caches)."""
    for module in ("tasks/quantize.py", "tasks/benchmark.py"):
        calls = [node for node in ast.walk(ast.parse((REPO / module).read_text()))
                 if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_isolated"]
        assert calls, module
        for call in calls:
            env = {k.arg: k.value for k in call.keywords}.get("env")
            assert isinstance(env, ast.Call) and getattr(env.func, "id", None) == "gpu_env", (
                f"{module}:{call.lineno}: run_isolated(..., env=gpu_env())")


def test_compile_cache_bench_splits_cold_and_warm():
    spec = importlib.util.spec_from_file_location("compile_cache_bench", REPO / "bench" / "compile_cache.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cold = {"stage_s": 400.0, "quantize_step_s": 150.0, "benchmark_step_s": 250.0, "load_s": {"fp16": 5, "gptq": 200}}
    warm = {"stage_s": 160.0, "quantize_step_s": 140.0, "benchmark_step_s": 20.0, "load_s": {"fp16": 4, "gptq": 4}}
    got = bench.split(cold, warm)
    assert got["cold_s"] == 400 and got["warm_s"] == 160 and got["compile_s"] == 240
    assert got["compile_fraction_of_cold"] == pytest.approx(0.6)
    assert got["compile_s_by_part"] == {"quantize_step": 10, "benchmark_step": 230, "load_fp16": 1, "load_gptq": 196}
