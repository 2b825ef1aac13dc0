"""Issue 26's whole path on one GPU, timed: a pushed fine-tune -> webhook -> 4-configuration sweep -> gate ->
publish of the winner -> catalog, cold (first push on a fresh host) and warm (the next push).

On the GPU machine (repo root, after ``source bench/gpu_env.sh``; ``.gpu/tok32k`` from bench/make_tokenizer.py)::

    python3 bench/webhook_sweep.py --out $OUT                 # the 7B shape, 2 members per GPU
    python3 bench/webhook_sweep.py --shape tiny --device cpu  # the same path on a CPU in minutes (a dry run)

The real parts, as an operator runs them on one host: ``prefect server start``; ``modelfactory deploy``'s
deployments (``modelfactory.interfaces.deploy``); one process worker on the ``cpu`` pool (the on-finetune flow
and its sweep, with ``MODELFACTORY_GPU_DEPLOYMENT=gpu-stage/gpu``); ``infra/gpu-host/start-workers.sh`` with one
GPU worker of ``--slots`` flow runs (``MODELFACTORY_GPU_SLOTS``; its ``kernels prepare`` runs first and is
timed apart); ``modelfactory serve`` (the webhook); the local Hub fake (``modelfactory.testing.hub_server``)
serving the watched repo ``acme/llama-7b-ft`` (a ``base`` watch whose spec is a sweep: group size 128/64 x
``desc_act`` false/true). Random weights (a fresh seed per push): the default gate's quality thresholds mean
nothing on them, so the watch's gate is ``preset: none`` with the runnability check (said in the JSON).

A push is a new commit on the Hub fake (the model's files are put into its object store directly: no
upload is timed), then the Hub's ``repo.content`` payload to ``POST /hooks/huggingface``. ``wall_s`` of a push:
from that POST to the on-finetune flow run's end (its sweep published the winner and closed every run).
Per-step wall times come from the catalog (the sweep's member runs and the GPU stage's records).

One JSON, ``<out>/<shape>-webhook-sweep-<gpu>.json``: ``gpu``, ``model``, ``command``, ``configs``, ``slots``,
``steps`` (per push: the catalog's step times of every member), ``wall_s_cold``, ``wall_s_warm``,
``marginal_s_per_config`` (warm: (wall - the time to the fp16 side's end) / configs), ``quantize_over_engine``
(each member: the quantize step's wall / GPTQModel's own time), ``compile_s`` (each side: torch.compile +
the first load), ``prepare_kernels_s``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compile_cache import SHAPES as LLAMA_SHAPES  # noqa: E402 - the random-weight Llama shapes of bench/

REPO_ID = "acme/llama-7b-ft"
SECRET = "webhook-sweep-secret"
SHAPES = {
    "llama-7b": LLAMA_SHAPES["llama-7b"],
    "tiny": {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_model(*, shape: str, tokenizer: Path, out: Path, seed: int) -> Path:
    """A random-weight Llama of *shape* in fp16 (built on the GPU where there is one), with *tokenizer*."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    vocab = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    config = LlamaConfig(**{**SHAPES[shape], "vocab_size": max(vocab, SHAPES[shape]["vocab_size"])}, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.set_default_dtype(torch.float16)
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for file in tokenizer.iterdir():
        if file.is_file():
            shutil.copy2(file, tmp / file.name)
    del model
    tmp.rename(out)
    return out


def push(hub, folder: Path, *, title: str) -> str:
    """Commit every file of *folder* to ``main`` of the Hub fake's repo (the object store filled directly, as a
    finished upload leaves it); the new commit's SHA."""
    from modelfactory.testing.hub_server import GITATTRIBUTES, LFS_SUFFIXES, Repo

    store = hub.store
    repo = store.repos.get(REPO_ID)
    if repo is None:
        repo = store.repos[REPO_ID] = Repo(id=REPO_ID, private=False, created_at="2026-12-07T00:00:00.000Z")
    files = {".gitattributes": store.regular_entry(GITATTRIBUTES)}

    def entry(path: Path) -> tuple[str, dict]:
        if path.suffix in LFS_SUFFIXES:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    digest.update(chunk)
            sha = digest.hexdigest()
            if not store.has_object(sha):
                os.link(path, store.object_path(sha)) if path.stat().st_dev == store.root.stat().st_dev \
                    else shutil.copy2(path, store.object_path(sha))
            return path.name, store.lfs_entry(sha, path.stat().st_size)
        return path.name, store.regular_entry(path.read_bytes())

    with ThreadPoolExecutor(max_workers=8) as pool:
        files.update(dict(pool.map(entry, sorted(p for p in folder.iterdir() if p.is_file()))))
    return store.commit(repo, branch="main", files=files, title=title, parent=repo.refs.get("main"))


def payload(sha: str) -> dict:
    """The Hub's webhook body for a push to main (https://huggingface.co/docs/hub/webhooks)."""
    return {"event": {"action": "update", "scope": "repo.content"},
            "repo": {"type": "model", "name": REPO_ID, "id": "6366c000a2abcdf2fd69a080", "private": False,
                     "headSha": sha, "owner": {"id": "61d2000c3c2083e1c08af22d"},
                     "url": {"web": f"https://huggingface.co/{REPO_ID}",
                             "api": f"https://huggingface.co/api/models/{REPO_ID}"}},
            "updatedRefs": [{"ref": "refs/heads/main", "oldSha": None, "newSha": sha}],
            "webhook": {"id": "6390e855e30d9209411de93b", "version": 3}}


def watch_spec(*, calibration: dict, device: str, store: Path, quick: bool) -> dict:
    """The watch's fields: the sweep of issue 26 (*quick*: a small benchmark, for the CPU dry run)."""
    benchmark = {"device": device}
    if quick:
        benchmark |= {"perplexity": {"max_tokens": 1024}, "decode": {"new_tokens": 8, "batch_sizes": [1]}}
    return {"quantize": {"bits": 4, "calibration": calibration},
            "grid": {"group_size": [128, 64], "desc_act": [False, True]},
            "benchmark": benchmark,
            "gate": {"preset": "none", "require_runnable": True},  # random weights: see the module docstring
            "objective": "speed", "publish_mode": "winner",
            "publish": {"destination": store.as_uri()}}


def cli(*args: str) -> list[str]:
    """``modelfactory ARGS`` with this interpreter (an image's console script may belong to another Python)."""
    return [sys.executable, "-c", "import sys; from modelfactory.interfaces.cli.main import main; sys.exit(main())",
            *args]


def wrappers(folder: Path) -> Path:
    """``prefect`` and ``modelfactory`` executables that run this interpreter (put first on the workers' PATH:
    start-workers.sh and the flow runs call them by name)."""
    folder.mkdir(parents=True, exist_ok=True)
    scripts = {"prefect": f'exec {sys.executable} -m prefect "$@"\n',
               "modelfactory": f'exec {sys.executable} -c "import sys; from modelfactory.interfaces.cli.main import '
                               f'main; sys.exit(main())" "$@"\n'}
    for name, body in scripts.items():
        (folder / name).write_text("#!/usr/bin/env bash\n" + body)
        (folder / name).chmod(0o755)
    return folder


def member_steps(catalog, sweep_id: str) -> dict:
    """Every member's catalog steps (name -> wall s, with the GPU stage's record of where and how long)."""
    detail = catalog.get_sweep(sweep_id)
    members = {}
    for member in detail.members:
        run = catalog.get_run(member.run_id)
        steps = {s.name: round(s.duration_s, 1) for s in run.steps}
        details = {s.name: s.detail or {} for s in run.steps}
        engine = run.metric("quantize_s", "gptq")  # GPTQModel's own time (model load + quantize), same run
        quantize_s = engine.value if engine else None
        members[member.label] = {
            "status": run.status, "steps": steps, "quantize_engine_s": quantize_s,
            "gpu_stage": {k: details.get("gpu-stage", {}).get(k) for k in ("queued_s", "duration_s", "state")},
            "decode_tok_s": (run.metric("decode_tok_s", "gptq").value if run.metric("decode_tok_s", "gptq") else None),
            "started_at": member.started_at.isoformat() if member.started_at else None,
            "finished_at": run.finished_at.isoformat() if run.finished_at else None, "gpu_stage_s": member.gpu_stage_s,
        }
    return {"winner_run_id": detail.winner_run_id, "front": list(detail.front), "status": detail.status,
            "created_at": detail.created_at.isoformat(),
            "finished_at": detail.finished_at.isoformat() if detail.finished_at else None, "members": members}


def side_records(home: Path) -> dict:
    """Each benchmark side's record under the work dir (the fp16 side's ``fp16.json``, a candidate's
    ``benchmark.json``): load and compile seconds, memory (the slot model's input) and decode rates."""
    keys = ("side", "kernel", "load_s", "compile_s", "mem_after_load_bytes", "mem_peak_bytes", "decode_tok_s",
            "decode_tok_s_by_batch", "decode_mode")
    out = {}
    for path in sorted((home / "work").rglob("*.json")):
        if path.name not in ("fp16.json", "benchmark.json"):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        sides = {"fp16": data} if path.name == "fp16.json" else data
        for name, side in sides.items():
            if isinstance(side, dict) and "load_s" in side:
                out[f"{path.parent.name[:12]}/{name}"] = {k: side.get(k) for k in keys}
    return out


def main() -> int:  # noqa: PLR0915 - one timed script, top to bottom
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-7b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--slots", type=int, default=2, help="GPU worker's flow runs at once (MODELFACTORY_GPU_SLOTS)")
    parser.add_argument("--root", default="/root/webhook-sweep", help="servers' homes, models, store")
    parser.add_argument("--tokenizer", default="/root/keep/tok32k")
    parser.add_argument("--cal-samples", type=int, default=128)
    parser.add_argument("--cal-len", type=int, default=2048)
    parser.add_argument("--pushes", type=int, default=2, help="1: cold only; 2: cold then warm")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers and workers on the way out
    root = Path(args.root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    home = root / "mf"
    os.environ.update({"MODELFACTORY_HOME": str(home), "PREFECT_HOME": str(root / "prefect-client")})
    os.environ.pop("MODELFACTORY_WORK_DIR", None)

    import httpx

    from modelfactory.testing.hub_server import READ_TOKEN, LocalHub
    from modelfactory.testing.prefect_server import Background, PrefectServer, api, child_env, wait_for

    begun = time.perf_counter()
    tokenizer = Path(args.tokenizer)
    if args.shape == "tiny" and not tokenizer.is_dir():
        from modelfactory.testing.models import save_smollm2_tokenizer

        tokenizer = save_smollm2_tokenizer(root / "tokenizer")
    hub = LocalHub(root / "hub").start()
    bin_dir = wrappers(root / "bin")
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    prefect = str(bin_dir / "prefect")
    server = PrefectServer(root / "prefect-server")
    server.cmd[0] = prefect
    server.start_and_wait(timeout=120)
    log(f"prefect server {server.api_url} (up {time.perf_counter() - begun:.0f} s)")
    os.environ["PREFECT_API_URL"] = server.api_url
    deploy = subprocess.run([sys.executable, "-m", "modelfactory.interfaces.deploy"], cwd=ROOT, capture_output=True,
                            text=True, env=child_env(PREFECT_API_URL=server.api_url), check=False)
    if deploy.returncode:
        raise SystemExit(f"deploy failed:\n{deploy.stdout}\n{deploy.stderr}")

    env = {"PREFECT_API_URL": server.api_url, "MODELFACTORY_HOME": str(home), "MODELFACTORY_SOURCE_DIR": str(ROOT),
           "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": READ_TOKEN,
           "HF_HUB_CACHE": str(root / "hf-cache"), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1", "PYTHONPATH": str(ROOT)}
    cpu_home = root / "cpu-worker"
    cpu_worker = Background("cpu-worker", [prefect, "--no-prompt", "worker", "start", "--pool", "cpu", "--type",
                                           "process", "--name", "cpu-1"],
                            env=child_env(**env, PREFECT_HOME=str(cpu_home), MODELFACTORY_GPU_DEPLOYMENT="gpu-stage/gpu"),
                            log=cpu_home / "worker.log")
    gpu_home = root / "gpu-worker"
    gpu_env = child_env(**env, PREFECT_HOME=str(gpu_home), PREFECT=prefect, MODELFACTORY=str(bin_dir / "modelfactory"),
                        MODELFACTORY_GPU_IDS="0",
                        MODELFACTORY_GPU_SLOTS=str(args.slots), WORKER_LOG_DIR=str(gpu_home / "logs"),
                        MODELFACTORY_PREPARE_KERNELS="1" if args.shape != "tiny" else "0")
    gpu_workers = Background("gpu-workers", ["bash", str(ROOT / "infra" / "gpu-host" / "start-workers.sh")],
                             env=gpu_env, log=gpu_home / "start-workers.log")
    serve_home = root / "serve"
    serve = Background("serve", cli("serve", "--port", str(port := _free_port())),
                       env=child_env(**env, PREFECT_HOME=str(serve_home), MODELFACTORY_WEBHOOK_SECRET=SECRET),
                       log=serve_home / "serve.log")
    started = time.perf_counter()
    cpu_worker.start()
    gpu_workers.start()
    serve.start()
    procs = (cpu_worker, gpu_workers, serve)

    def diagnostics() -> str:
        logs = sorted((gpu_home / "logs").glob("*.log")) if (gpu_home / "logs").is_dir() else []
        return "\n".join([p.tail(40) for p in procs] + [Path(f).read_text()[-6000:] for f in logs])

    try:
        wait_for("both workers online", lambda: all(any(w["status"] == "ONLINE" for w in api(
            server, "POST", f"/work_pools/{pool}/workers/filter")) for pool in ("cpu", "gpu")),
            timeout=900, every=2, diagnostics=diagnostics)
        prepare_s = time.perf_counter() - started  # the GPU worker's `kernels prepare`, then its start
        log(f"workers online after {prepare_s:.0f} s (GPU kernels prepared first)")
        url = f"http://127.0.0.1:{port}"
        wait_for("modelfactory serve", lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, timeout=120,
                 diagnostics=diagnostics)
        spec_file = root / "watch-sweep.yaml"
        spec_file.write_text(json.dumps(watch_spec(calibration={"num_samples": args.cal_samples,
                                                                "seq_len": args.cal_len},
                                                   device=args.device, store=root / "store",
                                                   quick=args.shape == "tiny")))
        subprocess.run(cli("watch", "add", REPO_ID, "--kind", "base", "--spec", str(spec_file)), check=True,
                       env=child_env(**env, PREFECT_HOME=str(serve_home)), cwd=ROOT)

        from modelfactory.catalog import open_catalog

        pushes = []
        for number in range(args.pushes):
            made = time.perf_counter()
            folder = make_model(shape=args.shape, tokenizer=tokenizer, out=root / f"model-v{number + 1}", seed=number)
            sha = push(hub, folder, title=f"fine-tune v{number + 1}")
            log(f"push {number + 1}: {REPO_ID}@{sha[:12]} (model made and committed in "
                f"{time.perf_counter() - made:.0f} s); delivering the webhook")
            start, posted_at = time.perf_counter(), datetime.now(UTC)
            answer = httpx.post(f"{url}/hooks/huggingface", json=payload(sha), headers={"X-Webhook-Secret": SECRET},
                                timeout=60)
            answer.raise_for_status()
            flow_run_id = answer.json().get("flow_run_id")
            log(f"webhook answered {answer.status_code}: {answer.json()}")

            def final(run_id=flow_run_id):
                run = api(server, "GET", f"/flow_runs/{run_id}")
                return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

            run = wait_for(f"on-finetune run {flow_run_id}", final, timeout=3600, every=2, diagnostics=diagnostics)
            wall_s = time.perf_counter() - start
            log(f"push {number + 1}: {run['state']['type']} after {wall_s:.0f} s")
            with open_catalog() as catalog:
                steps = member_steps(catalog, flow_run_id)
            starts = [datetime.fromisoformat(m["started_at"]) for m in steps["members"].values() if m["started_at"]]
            # Before the first member starts: the webhook, the on-finetune run, download (+ hash), the fp16 side.
            fixed_s = (min(starts).replace(tzinfo=min(starts).tzinfo or UTC) - posted_at).total_seconds() \
                if starts else None
            pushes.append({"sha": sha, "flow_run_id": flow_run_id, "state": run["state"]["type"], "wall_s": wall_s,
                           "before_first_member_s": fixed_s,
                           "marginal_s_per_config": (wall_s - fixed_s) / len(steps["members"]) if fixed_s else None,
                           **steps})
            write_result(args=args, pushes=pushes, prepare_s=prepare_s, home=home)
            if run["state"]["type"] != "COMPLETED":
                log(diagnostics())
                break
    finally:
        for proc in procs:
            proc.stop()
        server.stop()
        hub.stop()

    return 0 if pushes and all(p["state"] == "COMPLETED" for p in pushes) else 1


def write_result(*, args, pushes: list[dict], prepare_s: float, home: Path) -> Path:
    """The JSON of the pushes so far (written after each push: a run cut short keeps what it measured)."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    configs = list(pushes[0]["members"]) if pushes else []
    ratios = [m["steps"]["quantize"] / m["quantize_engine_s"] for p in pushes for m in p["members"].values()
              if m["steps"].get("quantize") and m.get("quantize_engine_s")]
    warm = pushes[1] if len(pushes) > 1 else None
    result = {
        "gpu": gpu, "cpu": None if gpu else "cpu", "model": f"{args.shape} (random weights, fp16)",
        "command": " ".join(["python3", *sys.argv]), "configs": configs, "slots": args.slots,
        "gate": "preset none + require_runnable (random weights)", "calibration": f"{args.cal_samples} x {args.cal_len}",
        "prepare_kernels_s": prepare_s, "wall_s_cold": pushes[0]["wall_s"] if pushes else None,
        "wall_s_warm": warm["wall_s"] if warm else None,
        "marginal_s_per_config": warm["marginal_s_per_config"] if warm else None,
        "quantize_over_engine": {"min": min(ratios), "max": max(ratios),
                                 "mean": sum(ratios) / len(ratios)} if ratios else None,
        "steps": pushes, "sides": (sides := side_records(home)),
    }
    fp16 = next((v for v in sides.values() if v["side"] == "fp16" and v.get("mem_peak_bytes")), None)
    if gpu and fp16:  # what the slot model (modelfactory.core.gpu_share) makes of this run's measured memory
        from modelfactory.core.gpu_share import members_per_gpu

        total = torch.cuda.get_device_properties(0).total_memory
        peak = fp16["mem_peak_bytes"] + fp16["mem_after_load_bytes"]
        result["slot_model"] = {"gpu_bytes": total, "member_peak_bytes": peak,
                                "members_per_gpu": members_per_gpu(gpu_bytes=total, member_peak_bytes=peak, max_members=8)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.shape}-webhook-sweep-{(gpu or 'cpu').split()[-1].lower()}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    log(f"written {path}")
    return path


def _free_port() -> int:
    from modelfactory.testing.env import free_port

    return free_port()


if __name__ == "__main__":
    sys.exit(main())
