"""Load, for real: a burst of factory runs fired at once against a 2-slot GPU pool (a `prefect server`,
`modelfactory.interfaces.deploy(gpus=2)`, `start-workers.sh` with two CPU "GPUs", --limit 1 each).

The same code as `bench/load_burst.py` (:mod:`modelfactory.testing.load`; the bench runs 20 and writes
bench/results/load-burst-20.json),
with a smaller burst: every run passes, never more than 2 gpu-stage runs at once (sampled every
0.5 s and from the exact start/end times), never two on one slot, the catalog holds exactly the
burst's runs with consistent steps/metrics/gate/publication, and afterwards no active slot on the
pool, its queues or any concurrency limit, no non-final flow run, and a probe takes both slots at once.

Budget: ~3.5 min on 2 cores (4 runs: two rounds of two GPU stages; each tiny GPU stage starts four
Python processes, 70-100 s on 2 shared cores; 6 runs took 7 min under heavy load).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from modelfactory.testing.env import own_work_dir
from modelfactory.testing.load import PoolRig, run_burst, summary

pytestmark = pytest.mark.pool

#: Burst size: two runs per slot, so half the burst queues behind the other half (each tiny GPU stage
#: costs ~100 s on 2 busy cores; 6 runs took 7 min). MODELFACTORY_LOAD_RUNS overrides (e.g. 20).
RUNS = int(os.environ.get("MODELFACTORY_LOAD_RUNS", "4"))
SLOTS = 2


@pytest.fixture(scope="module")
def rig(factory_home, tmp_path_factory) -> Iterator[PoolRig]:
    """Own work dir (nothing reused from other modules; shared with the workers), server, pool, 2 workers."""
    with own_work_dir(tmp_path_factory.mktemp("load-work")):
        with PoolRig(tmp_path_factory.mktemp("load-pool"), slots=SLOTS) as rig:
            yield rig


def test_burst_of_factory_runs_on_a_two_slot_pool(rig, tiny_llama):
    report = run_burst(rig, tiny_llama, runs=RUNS, timeout_s=1500)
    print(summary(report))
    failed = {name: check for name, check in report["checks"].items() if not check["ok"]}
    assert not failed, (json.dumps(failed, indent=2, default=str) + "\n"
                        + json.dumps(report["per_run"], indent=1, default=str) + "\n" + rig.diagnostics())
    assert report["concurrency"]["max_overlap_intervals"] == SLOTS
    assert report["all_checks_ok"]
