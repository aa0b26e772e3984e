"""End to end through the real command line: `python -m prefrun train ...` in a subprocess (forked from the
worker's zygote, tests/zygote.py, or a fresh interpreter)."""

import json
import os
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from .conftest import TINY_JOB, run_cli
from .wandb_records import run_info

pytestmark = pytest.mark.slow  # the default job, with every core: tests/test_default_job.py

METRIC_KEYS = {"step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
               "logps/chosen", "logps/rejected", "log_gamma/mean", "log_gamma/frac_positive", "lr", "grad_norm",
               "tokens_per_s"}


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("outputs/**/summary.json"))


def test_help_and_cfg_job(tmp_path):
    help_text = run_cli(["train", "--help"], tmp_path).stdout
    for group in ("model:", "data:", "loss: dpo, ipo", "sampler:", "optim:", "trainer:", "logger:", "experiment:"):
        assert group in help_text
    job = run_cli(["train", "--cfg", "job", "loss=ipo", "loss.beta=0.25"], tmp_path).stdout
    assert "_target_: prefrun.losses.ipo_loss" in job and "beta: 0.25" in job
    assert "usage: prefrun" in run_cli([], tmp_path).stdout


def test_a_run_forked_from_the_zygote_says_what_a_fresh_interpreter_says(tmp_path, monkeypatch):
    """`run_cli` forks its runs from tests/zygote.py: each in the test's working directory and environment, as a
    fresh `python -m prefrun` (PREFRUN_TEST_FRESH=1) runs it."""
    from .conftest import _ZYGOTE

    args = ["train", "--cfg", "job", "--resolve", "seed=7"]
    env = {"PREFRUN_CACHE": str(tmp_path / "cache")}
    forked = run_cli(args, tmp_path, env)
    assert _ZYGOTE.fits({**os.environ, **env}) and _ZYGOTE.proc.poll() is None  # the zygote ran it
    monkeypatch.setenv("PREFRUN_TEST_FRESH", "1")
    fresh = run_cli(args, tmp_path, env)
    assert f"cache_dir: {tmp_path / 'cache'}" in forked.stdout and "seed: 7" in forked.stdout
    assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout)
    bad_fresh = run_cli(["train", "trainer.batchsize=4"], tmp_path, check=False)
    monkeypatch.delenv("PREFRUN_TEST_FRESH")
    bad_forked = run_cli(["train", "trainer.batchsize=4"], tmp_path, check=False)
    assert bad_forked.returncode == 1 and "Could not override 'trainer.batchsize'" in bad_forked.stderr
    assert (bad_forked.returncode, bad_forked.stderr) == (bad_fresh.returncode, bad_fresh.stderr)


def test_embedded_job_writes_run_dir_and_reuses_reference_cache(tmp_path, cache_dir):
    first = run_cli(["train", *TINY_JOB], tmp_path)
    [run] = run_dirs(tmp_path)
    assert (run / "config.yaml").read_text().count("sft_steps: 20") == 1  # resolved config
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and METRIC_KEYS <= set(rows[-1])
    summary = json.loads((run / "summary.json").read_text())
    for when in ("eval_before", "eval_after"):
        assert set(summary[when]) == {"sampled", "greedy"}
        assert 0 <= summary[when]["sampled"]["mean"] <= 1 and summary[when]["sampled"]["num_prompts"] == 8
    assert {"torch", "transformers", "hydra-core"} <= set(summary["environment"]["packages"])
    assert "git_commit" in summary["environment"] and summary["peak_memory_mb"]["cpu_rss"] > 0
    AutoModelForCausalLM.from_pretrained(run / "checkpoint-final")
    assert "computed" in (run / "train.log").read_text() and "judged score" in first.stdout + first.stderr

    run_cli(["train", *TINY_JOB], tmp_path)
    second = [d for d in run_dirs(tmp_path) if d != run]
    log = second[0].joinpath("train.log").read_text()
    assert "cache hit" in log and "0 reference forwards" in log and "cached pools" in log and "(cached)" in log
    # Same seed, same machine: the same metrics.
    again = [json.loads(line) for line in second[0].joinpath("metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in rows], abs=1e-6)


def test_multirun_writes_one_directory_per_job(tmp_path, cache_dir):
    run_cli(["train", "-m", "loss.beta=0.1,0.2", *TINY_JOB, "eval.num_prompts=0", "trainer.save_final=false"],
            tmp_path)
    runs = run_dirs(tmp_path)
    assert len(runs) == 2 and all("multirun" in str(r) for r in runs)
    betas = sorted(float(r.joinpath("config.yaml").read_text().split("beta: ")[1].split()[0]) for r in runs)
    assert betas == [0.1, 0.2]


def test_local_model_and_jsonl_pairs(tmp_path, cache_dir, bpe_model_dir, pairs_jsonl):
    run_cli(["train", "model=hf", f"model.name_or_path={bpe_model_dir}", "data=jsonl", f"data.path={pairs_jsonl}",
             "~task", "data.eval_size=4", "trainer.batch_size=4", "trainer.max_steps=3", "trainer.log_every=1"],
            tmp_path)
    [run] = run_dirs(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_examples"] == 20 and summary["eval_after"] == {} and summary["final"]["step"] == 3
    pairs = summary["held_out_after"]
    assert pairs["num_examples"] == 4 and 0 <= pairs["rewards/accuracy"] <= 1 and pairs["loss"] > 0


def test_bad_data_path_is_one_clear_line(tmp_path, cache_dir, bpe_model_dir):
    proc = run_cli(["train", "model=hf", f"model.name_or_path={bpe_model_dir}", "data=jsonl",
                    "data.path=/no/such.jsonl", "~task"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "data.path='/no/such.jsonl': no such file" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_wandb_offline_runs_of_a_multirun_share_a_group(tmp_path, cache_dir):
    run_cli(["train", "-m", "logger=wandb", "logger.wandb.tags=[smoke]", "loss.beta=0.2,0.4", *TINY_JOB,
             "trainer.save_final=false"], tmp_path, env_extra={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    [sweep] = tmp_path.glob("outputs/multirun/*/*")
    betas = set()
    for job in sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")):
        [record] = job.glob("wandb/offline-run-*/run-*.wandb")
        info = run_info(record)  # parsed back from the offline file
        assert info["group"] == sweep.name and info["tags"] == ["smoke"]
        betas.add(info["config"]["loss"]["beta"])
        local = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert [h["train/loss"] for h in info["history"] if "train/loss" in h] == [r["loss"] for r in local]
        summary = json.loads((job / "summary.json").read_text())
        assert info["summary"]["eval_after/sampled/mean"] == summary["eval_after"]["sampled"]["mean"]
        assert info["summary"]["eval/samples/nrows"] == 2 * 2 * 8  # before/after x sampled/greedy x examples
    assert betas == {0.2, 0.4}
