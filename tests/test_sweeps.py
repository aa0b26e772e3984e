"""Sweeps through Hydra: a grid over seeds and β then `prefrun report`; an optuna search that
maximises the job's returned score. (The submitit launcher: tests/test_distributed.py runs a grid through it, two
tasks a job, preempted and requeued.)"""

import csv

import pytest
import yaml
from PIL import Image

from .conftest import TINY_JOB, run_cli

pytestmark = pytest.mark.slow

FAST = [*TINY_JOB, "trainer.save_final=false", "trainer.save_every=0"]


def test_grid_then_report(tmp_path, cache_dir):
    run_cli(["train", "-m", "seed=0,1", "loss.beta=0.2,0.6", *FAST], tmp_path)
    [sweep] = tmp_path.glob("outputs/multirun/*/*")
    out = run_cli(["report", str(sweep)], tmp_path).stdout.split()
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert len(rows) == 4 and {r["loss.beta"] for r in rows} == {"0.2", "0.6"} and {r["seed"] for r in rows} == {"0", "1"}
    assert all(r["after"] and r["final loss"] for r in rows)
    table = (sweep / "report.md").read_text()
    assert table.count("\n| ") == 5 and "| job | loss.beta | seed |" in table
    assert str(sweep / "score_vs_loss.beta.png") in out and not (sweep / "score_vs_seed.png").exists()
    for png in ("curves.png", "score_vs_loss.beta.png"):
        assert Image.open(sweep / png).size[0] > 300


def test_report_on_a_directory_without_jobs_is_one_line(tmp_path):
    proc = run_cli(["report", str(tmp_path)], tmp_path, check=False)
    assert proc.returncode != 0 and "no finished job" in proc.stderr and "Traceback" not in proc.stderr


def test_optuna_search_maximises_the_returned_score(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    run_cli(["train", "hparams_search=sort_optuna", "hydra.sweeper.n_trials=2", *FAST], tmp_path)
    [results] = tmp_path.glob("outputs/multirun/*/*/optimization_results.yaml")
    best = yaml.safe_load(results.read_text())
    assert set(best["best_params"]) == {"loss.beta", "optim.lr"} and 0 <= best["best_value"] <= 1
    summaries = list(results.parent.glob("*/summary.json"))
    assert len(summaries) == 2
