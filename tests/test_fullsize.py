"""The full-size smoke bench's machinery, on a tiny pipeline standing in for the random full-size one."""

import json

import pytest
from conftest import make_sd2_pipeline

from aptp.benchmarks.fullsize import format_rows, run_fullsize


@pytest.mark.slow
def test_every_stage_runs_in_its_own_process_and_reports_its_peak(tmp_path):
    base = make_sd2_pipeline(tmp_path / "tiny")
    (tmp_path / "run").mkdir()
    base.rename(tmp_path / "run" / "base")  # present: the bench uses it instead of building the full-size one
    rows = run_fullsize("sd21", tmp_path / "run", resolution=64, threads=1)
    assert [row["stage"] for row in rows] == ["prune", "assign", "finetune", "export", "generate"]
    assert all(row["rc"] == 0 and row["peak_bytes"] > 2**20 and row["seconds"] > 0 for row in rows)
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 1
    bank = json.loads((tmp_path / "run" / "pipeline" / "experts" / "config.json").read_text())
    assert max(bank["expert_macs"]) < 0.9 * bank["dense_macs"], "the experts are really pruned"
    assert json.loads((tmp_path / "run" / "fullsize.json").read_text())["stages"] == rows
    assert "generate" in format_rows("sd21", 64, rows)
