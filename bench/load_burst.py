"""Load burst: N factory runs fired at once against a GPU pool of S slots (issue 6, "Load").

The rig, the burst, its measurements and checks live in ``bench/load_rig.py``; this is the command line
around them (``tests/test_load.py`` runs it with a small burst)::

    .venv/bin/python bench/load_burst.py                 # N=20, S=2 -> bench/results/load-burst-20.json
    .venv/bin/python bench/load_burst.py --runs 6 --out /tmp/x.json

Exit code 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install

from modelfactory.testing.env import REPO  # noqa: E402
from load_rig import standalone_burst, summary  # noqa: E402  (bench/, this script's folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="factory runs fired at once (default 20)")
    parser.add_argument("--slots", type=int, default=2, help="GPU slots: workers with --limit 1 (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default bench/results/load-burst-N.json)")
    parser.add_argument("--home", type=Path, default=None, help="MODELFACTORY_HOME (default: a temp dir, removed)")
    parser.add_argument("--timeout", type=float, default=3600, help="max seconds for the whole burst")
    parser.add_argument("--no-probe", action="store_true", help="skip the post-burst slot probe")
    args = parser.parse_args(argv)
    out = args.out or REPO / "bench" / "results" / f"load-burst-{args.runs}.json"
    command = " ".join([".venv/bin/python", os.path.relpath(Path(sys.argv[0]).resolve(), REPO), *(argv or sys.argv[1:])])

    report = standalone_burst(runs=args.runs, slots=args.slots, timeout_s=args.timeout, probe=not args.no_probe,
                              home=args.home)
    report = {"command": command, **report}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(summary(report))
    print(f"-> {out}")
    return 0 if report["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
