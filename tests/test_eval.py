"""`prefrun eval` and the judgment cache: verdicts are reused (swapped pairs too) and never served to another
judge; swapping policy and baseline gives one minus every win rate by the method, with the cache off and a
position-biased judge; through the CLI a trained run is compared with its starting model, the same command
again judges nothing, AlpacaEval's files round-trip, two processes write what one writes, bad input is one line."""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from prefrun import winrate
from prefrun.compare import compare_answers, read_outputs, run_policies, sides, starting_model
from prefrun.errors import InputError
from prefrun.judges import Judge, Verdicts
from prefrun.judgments import JudgmentCache
from prefrun.model import files_fingerprint

from .conftest import TINY_JOB, run_cli, torchrun
from .test_distributed import launch
from .wandb_records import run_info


class LengthJudge(Judge):
    """A user's judge with a known behaviour: the longer answer wins, P = σ(len(a) - len(b) + bias) for the answer
    shown first, so with `bias` > 0 it favours whichever answer is shown first. Counts the pairs it judges."""

    def __init__(self, bias: float = 1.0, task=None) -> None:
        self.bias, self._judged = bias, 0

    def _compare(self, prompts, first, second) -> Verdicts:
        self._judged += len(prompts)
        shown_first = [1 / (1 + math.exp(-(len(a) - len(b) + self.bias))) for a, b in zip(first, second)]
        shown_second = [1 - 1 / (1 + math.exp(-(len(b) - len(a) + self.bias))) for a, b in zip(first, second)]
        return Verdicts(forward=shown_first, backward=shown_second)


PROMPTS = [f"sort {i}{i + 3}{i + 1}:" for i in range(6)]
POLICY = [[f"{i}" * (1 + i % 3)] for i in range(6)]
BASELINE = [[f"{i}" * 2, f"{i}" * (4 - i % 2)] for i in range(6)]  # two answers per prompt: every pair judged


def _cfg(**overrides):
    return OmegaConf.create({"judge_shard_size": 4, "interval_resamples": 200, "seed": 0, "judgments_dir": None,
                             **overrides})


def test_swapping_policy_and_baseline_gives_one_minus_every_win_rate_with_the_cache_off():
    judge = LengthJudge(bias=1.0)
    off = JudgmentCache(None)
    ab = compare_answers(PROMPTS, POLICY, BASELINE, judge, off, _cfg())
    ba = compare_answers(PROMPTS, BASELINE, POLICY, judge, off, _cfg())
    assert judge._judged == 2 * ab["num_pairs"] == 2 * 12, "nothing cached: every pair judged both times"
    for key in ("win_rate", "hard_win_rate", "lc_win_rate"):
        assert ab[key] == pytest.approx(1 - ba[key], abs=1e-9), key
    assert 0 < ab["position_bias_rate"] <= 1 and ab["position_bias_rate"] == pytest.approx(ba["position_bias_rate"])
    # The symmetrised preference, not the first position's: the biased order alone would say otherwise.
    assert ab["win_rate"] == pytest.approx(winrate.win_rate(
        [(f + b) / 2 for f, b in zip(*_orders(judge))], [n for n in range(6) for _ in range(2)]))


def _orders(judge):
    rows = [(p, a, b) for p, pa, pb in zip(PROMPTS, POLICY, BASELINE) for a in pa for b in pb]
    v = judge.compare([p for p, _, _ in rows], [a for _, a, _ in rows], [b for _, _, b in rows])
    return v.forward, v.backward


def test_the_cache_reuses_verdicts_and_their_swap_and_never_serves_another_judge(tmp_path):
    cache, judge = JudgmentCache(tmp_path / "judgments"), LengthJudge(bias=1.0)
    first = compare_answers(PROMPTS, POLICY, BASELINE, judge, cache, _cfg(judgments_dir=str(tmp_path)))
    assert (first["judged_pairs"], first["reused_pairs"], judge._judged) == (12, 0, 12)
    parts = sorted((tmp_path / "judgments").glob("*/part-*.jsonl"))
    assert len(parts) == 3, "12 new pairs in shards of 4: one file each"
    again = compare_answers(PROMPTS, POLICY, BASELINE, judge, cache, _cfg())
    assert (again["judged_pairs"], again["reused_pairs"], judge._judged) == (0, 12, 12)
    assert {k: v for k, v in again.items() if "pairs" not in k} == {k: v for k, v in first.items() if "pairs" not in k}
    swapped = compare_answers(PROMPTS, BASELINE, POLICY, judge, cache, _cfg())
    assert (swapped["judged_pairs"], judge._judged) == (0, 12), "a swapped pair is served from the same entry"
    assert swapped["win_rate"] == pytest.approx(1 - first["win_rate"], abs=1e-12)
    # A new policy against the same baseline: only its new pairs are judged.
    new_policy = [POLICY[0], ["longer answer"], *POLICY[2:]]
    third = compare_answers(PROMPTS, new_policy, BASELINE, judge, cache, _cfg())
    assert (third["judged_pairs"], third["reused_pairs"], judge._judged) == (2, 10, 14)
    # Another judge (its fingerprint differs) is never served these verdicts.
    other = LengthJudge(bias=0.0)
    compare_answers(PROMPTS, POLICY, BASELINE, other, cache, _cfg())
    assert other._judged == 12
    # A damaged part is ignored: its pairs are judged again, the rest reused.
    parts[0].write_text(parts[0].read_text()[:-20])
    fresh = LengthJudge(bias=1.0)
    redone = compare_answers(PROMPTS, POLICY, BASELINE, fresh, cache, _cfg())
    assert fresh._judged == 4 and redone["win_rate"] == pytest.approx(first["win_rate"], abs=1e-12)


def test_split_over_nodes_whose_caches_differ_every_process_gets_every_verdict_and_every_node_keeps_them(tmp_path):
    """Two one-process nodes with their own caches, one of which already knows half of the pairs (as after a
    round whose pairs a node judged): the pairs new to either are judged once, split, and each node's cache
    ends up with all of them (before, the processes cut different shards and one stopped on a KeyError)."""
    from .judgments_work import FIRST, PROMPTS, SECOND, LengthJudge

    out = tmp_path / "work.json"
    torchrun("judgments_work.py", out, tmp_path)
    seen = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    expected = LengthJudge().compare(PROMPTS, FIRST, SECOND)
    for rank in (0, 1):
        assert seen[rank]["forward"] == pytest.approx(expected.forward) and seen[rank]["counts"]["pairs"] == 6
        assert seen[rank]["counts"]["judged"] == 6, "new to node 1: judged for both, once"
        assert (seen[rank]["counts_again"]["judged"], seen[rank]["judged_again"]) == (0, 0), rank
    assert seen[0]["judged"] + seen[1]["judged"] == 6, "each shard judged by one process"
    for node in ("node0", "node1"):
        split_parts = sorted(p.name for p in tmp_path.glob(f"{node}/*/part-*.jsonl") if p.name.count("-") == 1)
        assert len(split_parts) == 3, (node, split_parts)
    assert split_parts == sorted(p.name for p in tmp_path.glob("node0/*/part-*.jsonl") if p.name.count("-") == 1)


def test_outputs_files_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "sort 1:"}]')
    with pytest.raises(InputError, match=r"bad.json, record 1: needs `instruction`"):
        read_outputs(bad)
    bad.write_text("{not json")
    with pytest.raises(InputError, match=r"bad.json: not JSON"):
        read_outputs(bad)
    lines = tmp_path / "outputs.jsonl"
    lines.write_text(json.dumps({"prompt": "a", "outputs": ["x", "y"]}) + "\n" + json.dumps({"prompt": "a",
                                                                                            "output": "z"}) + "\n")
    assert read_outputs(lines) == {"a": [["x", "y"], ["z"]]}, "a repeated prompt keeps each record"


# -- through the CLI -----------------------------------------------------------------------------------------

EVAL = ["num_prompts=16", "generator=hf", "generator.shard_size=4", "interval_resamples=300"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_job_model):
    root = tmp_path_factory.mktemp("eval")
    cache = root / "cache"
    shutil.copytree(tiny_job_model, cache / "models" / tiny_job_model.name)
    env = {"PREFRUN_CACHE": str(cache)}
    run_cli(["train", *TINY_JOB, "optim.lr=3e-3", f"hydra.run.dir={root / 'run'}"], root, env)
    return root, env


def _result(eval_dir) -> dict:
    summary = json.loads((eval_dir / "eval.json").read_text())
    (result,) = summary["results"].values()
    return result


@pytest.mark.slow
def test_prefrun_eval_of_a_run_against_its_start_swapped_rerun_alpaca_eval_files_and_two_processes(trained_run):
    root, env = trained_run
    out = run_cli(["eval", "policy=run", *EVAL, "hydra.run.dir=e1"], root, env)
    said = out.stdout + out.stderr
    first = _result(root / "e1")
    summary = json.loads((root / "e1" / "eval.json").read_text())
    assert "the starting model of" in summary["baseline"] and summary["num_prompts"] == 16
    assert first["num_pairs"] == 16 and first["judged_pairs"] > 0 and first["position_bias_rate"] == 0
    low, high = first["win_rate_interval"]
    assert low <= first["win_rate"] <= high and 0 <= first["lc_win_rate"] <= 1
    assert "win rate against baseline" in said and "policy" in said
    assert (root / "e1" / "summary.json").exists() and (root / "e1" / "config.yaml").exists()

    # The same command again (to W&B too): nothing generated differs, nothing is judged.
    again = run_cli(["eval", "policy=run", *EVAL, "logger=wandb", "hydra.run.dir=e2"], root,
                    {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert "judged 0 new pairs, 16 reused" in again.stdout + again.stderr
    assert _result(root / "e2")["win_rate"] == first["win_rate"]
    [record] = (root / "e2").glob("wandb/offline-run-*/run-*.wandb")
    logged = run_info(record)["summary"]
    assert logged["eval/policy/win_rate"] == first["win_rate"] and "eval/policy/lc_win_rate" in logged

    # AlpacaEval's files, written by the first run, read back: the same figures, nothing judged.
    exported = json.loads((root / "e1" / "outputs" / "policy.json").read_text())
    assert set(exported[0]) == {"instruction", "output", "generator"} and len(exported) == 16
    files = run_cli(["eval", "policy=e1/outputs/baseline.json", "baseline=e1/outputs/policy.json", *EVAL,
                     "hydra.run.dir=e3"], root, env)
    assert "judged 0 new pairs" in files.stdout + files.stderr
    swapped = _result(root / "e3")
    for key in ("win_rate", "hard_win_rate", "lc_win_rate"):
        assert swapped[key] == pytest.approx(1 - first[key], abs=1e-9), key

    # Two processes (fresh judgment cache): each generates half of each side's shards, one writer, same figures.
    two = launch(["eval", "policy=run", *EVAL, "judgments_dir=judgments2", "hydra.run.dir=e4"], root, env)
    said = two.stdout + two.stderr
    assert said.count("2 of the shards on this process (of 2)") >= 2, said[-3000:]
    assert said.count("win rate against baseline") == 1
    assert {k: v for k, v in _result(root / "e4").items() if "pairs" not in k} == \
        {k: v for k, v in first.items() if "pairs" not in k}
    assert len(list((root / "judgments2").glob("*/part-*.jsonl"))) == 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_prefrun_eval_through_vllm_gives_hfs_greedy_answers(trained_run):
    """generator=vllm: the engine loads the trained checkpoint from its directory (the parent holds only the
    tokenizer) and answers with the chat template training used; greedy, its answers are HF's word for word, so
    against the same baseline answers (HF's, read back from AlpacaEval's file) every figure is the same."""
    root, env = trained_run
    greedy = ["num_prompts=16", "generator.temperature=0", "generator.shard_size=8", "interval_resamples=300",
              "judgments_dir=null"]
    run_cli(["eval", "policy=run", *greedy, "generator=hf", "hydra.run.dir=v1"], root, env)
    engine = run_cli(["eval", "policy=run", "baseline=v1/outputs/baseline.json", *greedy, "generator=vllm",
                      "hydra.run.dir=v2"], root, env)
    assert "generate (vllm)" in engine.stdout + engine.stderr
    answers = {(d, side): [r["output"] for r in json.loads((root / d / "outputs" / f"{side}.json").read_text())]
               for d in ("v1", "v2") for side in ("policy", "baseline")}
    assert answers["v2", "policy"] == answers["v1", "policy"] != answers["v1", "baseline"]
    assert _result(root / "v2") == _result(root / "v1")
    # The engine's answers are kept under the weights' bytes, not their path: a policy retrained into the same
    # directory is answered again, not read back from these shards.
    job = json.loads((root / "v2" / "outputs" / "policy" / "manifest.json").read_text())
    assert job["weights"] == files_fingerprint(root / "run" / "checkpoint-final", "policy")


@pytest.mark.slow
def test_sides_that_cannot_be_evaluated_are_one_line(trained_run):
    root, _ = trained_run
    cfg = OmegaConf.create({"dtype": "auto", "trust_remote_code": False})
    with pytest.raises(InputError, match="baseline is not set and policy="):
        starting_model(str(root / "run" / "checkpoint-final"), root / "cache")
    with pytest.raises(InputError, match="no such file of outputs"):
        sides(str(root / "missing.json"), "policy", cfg, root / "cache")
    with pytest.raises(InputError, match="is a file, but not outputs"):
        sides(str(root / "run" / "config.yaml"), "policy", cfg, root / "cache")
    unfinished = root / "unfinished"
    unfinished.mkdir(exist_ok=True)
    shutil.copy(root / "run" / "config.yaml", unfinished / "config.yaml")
    with pytest.raises(InputError, match="run directory without a policy to evaluate"):
        sides(str(unfinished), "policy", cfg, root / "cache")
    (side,) = sides(str(root / "run"), "policy", cfg, root / "cache")
    assert side.model_path.endswith("checkpoint-final")
    # Named by their own key before anything is generated (they were model.name_or_path, after the baseline's answers)
    with pytest.raises(InputError, match=r"^policy='/no/such/dir': no such file or directory"):
        sides("/no/such/dir", "policy", cfg, root / "cache")
    (root / "empty").mkdir(exist_ok=True)
    with pytest.raises(InputError, match=r"^baseline='.*empty': a directory without config.json"):
        sides(str(root / "empty"), "baseline", cfg, root / "cache")


def test_an_unfinished_online_run_is_evaluated_as_far_as_it_got_and_says_so(tmp_path, caplog):
    run = tmp_path / "run"
    (run / "rounds" / "1" / "policy_hat").mkdir(parents=True)
    (run / "rounds" / "1" / "policy_hat" / "config.json").write_text("{}")
    (run / "rounds" / "1" / "round.json").write_text("{}")
    (run / "config.yaml").write_text("online:\n  rounds: 3\n")
    assert run_policies(run) == [("round-1", run / "rounds" / "1" / "policy_hat")]
    assert "is an unfinished run: rounds 1-1 of 3 are done" in caplog.text


def test_the_report_tables_win_rates_per_round_and_their_mean_over_seeds(tmp_path):
    from prefrun.report import report

    def pairwise(rate):
        return {"win_rate": rate, "win_rate_interval": [rate - 0.1, rate + 0.1], "lc_win_rate": rate}

    for job, (seed, rates) in enumerate([(0, [0.6, 0.7]), (1, [0.5, 0.8])]):
        run = tmp_path / str(job)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n- online=apo\n")
        rounds = [{"round": t + 1, "eval": {"policy_hat": {"sampled": {"vs_start": pairwise(r)}},
                                            **({"policy": {"sampled": {"vs_start": pairwise(r + 0.01)}}} if t == 0
                                               else {})}} for t, r in enumerate(rates)]
        after = {"sampled": {"mean": 0.5, "stderr": 0.01, "vs_start": pairwise(rates[-1])}}
        (run / "summary.json").write_text(json.dumps({"rounds": rounds, "eval_before": after, "eval_after": after}))
    paths = report(tmp_path)
    table = (tmp_path / "report.md").read_text()
    assert "| 0 | 0 | 0.600 [0.500, 0.700] (0.610) | 0.700 [0.600, 0.800] |" in table
    assert "| (all) | 2 | 0.550 ± 0.050 | 0.750 ± 0.050 |" in table
    assert tmp_path / "win_rate_per_round.png" in paths
