"""Load, for real: ``bench/load_burst.py`` run as a command with a small burst. Its rig
(``bench/load_rig.py``: a `prefect server`, `modelfactory.interfaces.deploy(gpus=2)`, `start-workers.sh`
with two CPU "GPUs", --limit 1 each) fires the runs at once, samples the pool and checks: every run
passes, never more than 2 gpu-stage runs at once, never two on one slot, the catalog holds exactly the
burst's runs with consistent steps/metrics/gate/publication, and afterwards nothing holds a slot and a
probe takes both slots at once. The bench itself runs 20 (bench/results/load-burst-20.json); tests and
bench never import each other, so this runs the script.

Budget: ~2.5 min on 2 cores (one round of two tiny GPU stages, each starting four Python processes).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modelfactory.testing.env import REPO

pytestmark = pytest.mark.pool

#: One run per slot: both slots busy at once, the whole rig exercised at the smallest cost.
RUNS = SLOTS = 2


def test_load_burst_bench_passes_its_checks_on_a_small_burst(tmp_path):
    out = tmp_path / "report.json"
    command = [sys.executable, str(REPO / "bench" / "load_burst.py"), "--runs", str(RUNS), "--slots", str(SLOTS),
               "--home", str(tmp_path / "home"), "--out", str(out), "--timeout", "1200"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    print(done.stdout[-4000:])
    assert out.is_file(), done.stdout[-6000:] + done.stderr[-6000:]
    report = json.loads(out.read_text())
    failed = {name: check for name, check in report["checks"].items() if not check["ok"]}
    assert not failed, (json.dumps(failed, indent=2, default=str) + "\n"
                        + json.dumps(report["per_run"], indent=1, default=str) + "\n" + done.stderr[-6000:])
    assert done.returncode == 0 and report["all_checks_ok"]
    assert report["runs"] == RUNS and report["concurrency"]["max_overlap_intervals"] == SLOTS
    assert report["probe"] is not None, "the post-burst probe did not run"
