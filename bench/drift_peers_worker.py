"""Runs peer drift checks on request, inside a side virtual environment that has them.

    <side venv>/bin/python bench/drift_peers_worker.py REFERENCE.npy WINDOW.npy

Loads both arrays ([rows, features]) once, imports Alibi Detect and Evidently, prints
"ready", then for each line read on stdin ("alibi" or "evidently") runs that library's
drift check of every feature and prints "done <drifting features>". Used by
bench/bench_drift_peers.py, which times the round trips; kept out of the project's own
environment because the peers bring heavy dependencies (pandas, and more).
"""

from __future__ import annotations

import sys
import warnings

import numpy as np


def main() -> int:
    reference, window = np.load(sys.argv[1]), np.load(sys.argv[2])
    warnings.filterwarnings("ignore")
    import pandas as pd
    from alibi_detect.cd import KSDrift
    from evidently import Report
    from evidently.presets import DataDriftPreset

    columns = [f"x{i}" for i in range(reference.shape[1])]
    reference_frame = pd.DataFrame(reference, columns=columns)
    window_frame = pd.DataFrame(window, columns=columns)
    alibi = KSDrift(reference, p_val=0.05, correction="fdr")  # per-feature KS, Benjamini-Hochberg

    def run_alibi() -> int:
        result = alibi.predict(window, drift_type="feature")
        return int(np.sum(result["data"]["is_drift"]))

    def run_evidently() -> int:
        snapshot = Report([DataDriftPreset()]).run(current_data=window_frame, reference_data=reference_frame)
        drifted = snapshot.dict()["metrics"][0]["value"]["count"]
        return int(drifted)

    checks = {"alibi": run_alibi, "evidently": run_evidently}
    print("ready", flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name not in checks:
            print(f"error unknown check {name!r}", flush=True)
            continue
        print(f"done {checks[name]()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
