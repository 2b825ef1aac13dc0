"""Faults injected for real: identical runs at once, a step output on a full disk.

The full disk is a real 1 MiB tmpfs mounted for the test (the CI machine runs tests as root);
the concurrent runs are two real factory flow runs on the tiny model. Faults of one step live with
that step: a full store in test_publish.py, a killed quantization in test_quantize.py, corrupted
weights in test_download.py.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from modelfactory.catalog import open_catalog
from modelfactory.core import workdir
from modelfactory.core.errors import DiskFullError
from modelfactory.interfaces.runner import run_factory
from modelfactory.testing.disks import small_disk
from modelfactory.testing.env import own_work_dir
from modelfactory.testing.models import TINY_GATE, tiny_spec

# --------------------------------------------------------------------------- a step output on a full disk


def test_step_output_on_a_full_disk_is_removed(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk") as disk:
        with pytest.raises(DiskFullError, match="the merge step ran out of disk space"):
            with workdir.building("merge", "k1", root=disk) as (tmp, _marker):
                (tmp / "model.safetensors").write_bytes(os.urandom(3 << 20))
        assert workdir.completed("merge", "k1", root=disk) is None
        assert list((disk / "merge").iterdir()) == []


# --------------------------------------------------------------------------- identical runs at once


def test_two_identical_runs_at_once_one_works_the_other_reuses(prefect, tiny_llama, tmp_path):
    spec = tiny_spec(tiny_llama, name="twins", gate=TINY_GATE)
    outcomes: dict[int, object] = {}

    def run(i: int) -> None:
        outcomes[i] = run_factory(spec)

    with own_work_dir(tmp_path / "work"):
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
    assert len(outcomes) == 2, outcomes
    first, second = outcomes.values()
    assert first.status == second.status == "passed"
    assert first.artifact_uri == second.artifact_uri
    quantize = sorted(
        {s.name: s.status for s in open_catalog().get_run(o.run_id).steps}["quantize"] for o in (first, second)
    )
    assert quantize == ["ok", "reused"], "exactly one run quantizes, the other reuses its output"
