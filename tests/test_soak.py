"""The soak benchmark in two minutes (``bench/soak.py``): the app started as ``python
app.py`` starts it, training on, two people chatting, voting, regenerating, continuing
and writing answers; nothing errors and every acknowledged vote and written answer is
stored. The hour-long run is a benchmark (docs/performance.md, "Soak"); this one
guards the script and the app's bookkeeping. About two minutes on 2 cores: marked slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# Small training steps, so that a reward round and PPO steps happen within the run.
QUICK_TRAINING = [
    "loop.min_votes=4", "loop.reward_every_votes=4", "reward.min_pairs=2", "reward.steps_per_round=4",
    "ppo.batch_size=2", "ppo.minibatch_size=2", "ppo.epochs=1", "ppo.checkpoint_every=1", "sampling.max_new_tokens=16",
]


def test_a_short_soak_loses_nothing_and_errors_nowhere(tiny_path, tmp_path):
    args = [sys.executable, "bench/soak.py", "--model", str(tiny_path), "--people", "2", "--minutes", "1.2",
            "--window-minutes", "0.4", "--out", str(tmp_path)]
    for setting in QUICK_TRAINING:
        args += ["--set", setting]
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    assert all(report["checks"].values()) and report["errors"] == []
    windows = report["windows"]
    assert len(windows) >= 3 and windows[-1]["votes_acknowledged"] >= 4
    assert windows[-1]["votes_stored"] == windows[-1]["votes_acknowledged"] == report["final_stored"]["votes"]
    assert windows[-1]["reward_version"] >= 1  # the training loop ran, on the votes cast
    assert all(w["rss_mb"] > 100 for w in windows)  # the app process's own memory, read from /proc
    assert all(w["rss_peak_mb"] >= w["rss_mb"] for w in windows)  # the highest reading within each window
    assert (tmp_path / "soak.csv").exists() and (tmp_path / "app.log").exists()
