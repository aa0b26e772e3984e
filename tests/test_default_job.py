"""`prefrun train` with no arguments, as a user runs it: the embedded default job. (Its numbers depended on the
threads' summation order while the embedded model was fine-tuned on the run's threads, and the module ran alone
with every core; built on one thread, the job gives 0.494 -> 0.592 on one thread or two.)"""

import json

import pytest

from .conftest import run_cli
from .test_cli import run_dirs

pytestmark = [pytest.mark.slow]


def test_default_job_improves_the_judged_score(tmp_path, cache_dir):
    """`prefrun train` with no arguments: an imperfect reference and a clear improvement."""
    run_cli(["train"], tmp_path)
    [run] = run_dirs(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["eval_before"]["sampled"], summary["eval_after"]["sampled"]
    assert before["mean"] < 0.8 and before["num_prompts"] >= 200
    assert after["mean"] - before["mean"] > 3 * (before["stderr"] ** 2 + after["stderr"] ** 2) ** 0.5
    assert after["vs_start"]["win_rate_interval"][0] > 0.5  # the paired comparison agrees
    # (Greedy decoding is not what DPO on sampled pairs optimises: with this model it fell, 0.845 -> 0.724,
    # docs/results.md; it is reported, not asserted.)
