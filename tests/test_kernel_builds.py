"""``modelfactory kernels prepare``: every kernel built or reported (never an escaped error), the result alone on
stdout. The builds themselves need a GPU (bench/gpu_verdict.py measures them on one)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error

from modelfactory.benchmark import kernel_builds


def test_a_kernel_that_cannot_be_fetched_offline_is_reported_and_the_others_still_build(monkeypatch, tmp_path):
    """Seen on an offline H100: Machete's CUTLASS download raised URLError, which escaped and ended the command."""
    import gptqmodel.extension

    def load(name):
        if name == "machete":
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return {name: True}

    monkeypatch.setattr(gptqmodel.extension, "load", load)
    builds = kernel_builds.prepare_kernels(kernels=("marlin_fp16", "machete"), cutlass_dir=tmp_path)
    assert [(b.kernel, b.ok) for b in builds] == [("marlin_fp16", True), ("machete", False)]
    assert builds[1].error.startswith("URLError: ") and "name resolution" in builds[1].error


def test_prepare_prints_only_its_result_on_stdout_and_exits_1_when_a_kernel_is_not_ready():
    """On this CPU machine no CUDA kernel can be built: each says why, as JSON on stdout (GPTQModel's own log
    lines go to stderr), and the exit code says not everything is ready."""
    done = subprocess.run([sys.executable, "-c", "from modelfactory.interfaces.cli.main import main; main()",
                           "kernels", "prepare", "--kernel", "marlin_fp16", "--format", "json"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1, done.stderr
    (build,) = json.loads(done.stdout)
    assert build["kernel"] == "marlin_fp16" and not build["ok"] and "CUDA" in build["error"]
