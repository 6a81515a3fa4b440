"""bench/loso.py: a thread count that torch cannot use is one usage line before anything is composed or trained."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "loso.py"


def test_threads_below_one_is_one_usage_line(tmp_path):
    for bad in ("0", "-1"):
        r = subprocess.run([sys.executable, str(SCRIPT), "--holdout", "pbc", "--out", str(tmp_path / "run"),
                            "--threads", bad], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "--threads: must be >= 1" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "run").exists()  # refused before any work


def test_an_unknown_adaptation_is_one_usage_line(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--holdout", "pbc", "--out", str(tmp_path / "run"),
                        "--adapt", "tent"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "self-training" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_source_share_out_of_range_is_one_usage_line(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--holdout", "pbc", "--out", str(tmp_path / "run"),
                        "--adapt", "stats", "--source-share", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--source-share: must be in [0, 1)" in r.stderr and "Traceback" not in r.stderr
