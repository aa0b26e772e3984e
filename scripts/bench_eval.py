#!/usr/bin/env python
"""Judged evaluation: what each judge costs per pair, and what the judgment cache saves, in one run.

    python scripts/bench_eval.py                          # 512 pairs, judges of ~0.4M parameters (random weights)
    python scripts/bench_eval.py --pairs 1024 --hidden 512 --layers 8   # ~25M-parameter judges
    python scripts/bench_eval.py --json out.json          # the numbers as JSON too

Every judge runs prefrun's own path: `JudgmentCache.compare`, what `prefrun eval` and the judged pools call (the
pairs the cache lacks are judged, the rest read back), timed; then `compare_answers` once, as `prefrun eval`
reports (the win rate, its bootstrap interval, the length-controlled fit), checked and not timed. The
judges: judge=rule (the sort task's), judge=reward_model and judge=pairwise (a Llama sequence classifier built
here), judge=llm (a Llama causal LM built here, read at its "A" / "B" logits), and where vLLM is installed the same
LLM judge with judge.backend=vllm (its weights in a vLLM engine; load = the engine's start). Model and tokenizer are prefrun's
embedded recipe (character tokenizer, head_dim 64), only wider and deeper as asked; the weights are random,
so the verdicts mean nothing: only the cost is measured. Each judge, on the same prompts and answers:
  cold     an empty cache: every pair judged (both orders for pairwise and llm, two texts scored for
           reward_model), pairs/s;
  warm     the same command again: every verdict read back (the ratio to cold is what a rerun saves);
  half     a new model against the same baseline, half of its answers unchanged: only the new pairs judged.
The judge's load time (weights read and hashed for the fingerprint) is reported apart; `figures` is the cost
of the win rate, the interval and the LC fit (`winrate.summary`, --resamples bootstrap resamples), which every
evaluation adds once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prefrun import winrate  # noqa: E402
from prefrun.compare import compare_answers  # noqa: E402
from prefrun.judges import LLMJudge, PairwiseJudge, RewardModelJudge, RuleJudge  # noqa: E402
from prefrun.judgments import JudgmentCache  # noqa: E402
from prefrun.tasks import SortDigits  # noqa: E402
from prefrun.tiny import char_tokenizer  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=512, help="prompts, one answer per side each")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="the model judges' judge.batch_size")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (prefrun eval's default)")
    p.add_argument("--no-vllm", action="store_true", help="leave out judge=llm judge.backend=vllm")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    return p.parse_args()


def build(kind: type, path: Path, hidden: int, layers: int) -> Path:
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), head_dim=64,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, num_labels=1)
    kind(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def answers(prompts: list[str], seed: int) -> list[list[str]]:
    """A sort-like answer of 8-40 characters per prompt."""
    rng = random.Random(seed)
    return [["".join(rng.choice("0123456789") for _ in range(rng.randint(8, 40)))] for _ in prompts]


def firsts(answers: list[list[str]]) -> list[str]:
    return [a[0] for a in answers]


def timed(call, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = call(*args, **kwargs)
    return time.perf_counter() - start, out


def main() -> None:
    args = parse_args()
    task = SortDigits()
    prompts = task.prompts("eval", args.pairs)
    baseline, model = answers(prompts, 1), answers(prompts, 2)
    changed = [m if n % 2 else [m[0] + "9"] for n, m in enumerate(model)]  # half the pairs new
    cfg = OmegaConf.create({"judge_shard_size": 256, "interval_resamples": args.resamples, "seed": 0,
                            "judgments_dir": "bench"})
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    settings = {"batch_size": args.batch_size, "dtype": "float32", "device": "cpu"}
    judges = {
        "rule": lambda: RuleJudge(task=task),
        "reward_model": lambda: RewardModelJudge(str(build(LlamaForSequenceClassification, work / "rm", args.hidden,
                                                           args.layers)), **settings),
        "pairwise": lambda: PairwiseJudge(str(build(LlamaForSequenceClassification, work / "pr", args.hidden,
                                                    args.layers)), **settings),
        "llm": lambda: LLMJudge(str(build(LlamaForCausalLM, work / "llm", args.hidden, args.layers)),
                                chat_template="none", **settings),
    }
    if importlib.util.find_spec("vllm") is not None and not args.no_vllm:  # the same weights in a vLLM engine
        judges["llm (vllm)"] = lambda: LLMJudge(str(work / "llm"), chat_template="none", backend="vllm",
                                                batch_size=args.batch_size, dtype="float32")
    params = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(
        vocab_size=len(char_tokenizer()), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64), head_dim=64)).parameters())
    load_before = os.getloadavg()[0]
    rows = {}
    for name, make in judges.items():
        judge = make()
        load_s, _ = timed(judge.fingerprint)
        cache = JudgmentCache(work / f"judgments-{name}")
        cold_s, (cold, _) = timed(cache.compare, judge, prompts, firsts(model), firsts(baseline))
        warm_s, (warm, counts) = timed(cache.compare, judge, prompts, firsts(model), firsts(baseline))
        half_s, (_, half) = timed(cache.compare, judge, prompts, firsts(changed), firsts(baseline))
        assert counts["judged"] == 0 and warm.preference == cold.preference, name
        assert half["judged"] == args.pairs // 2, (name, half)
        figures = compare_answers(prompts, model, baseline, judge, cache, cfg)  # what prefrun eval reports
        assert figures["judged_pairs"] == 0 and 0 <= figures["win_rate"] <= 1, name
        judge.close()
        rows[name] = {"load_s": load_s, "cold_s": cold_s, "warm_s": warm_s, "half_s": half_s,
                      "cold_pairs_per_s": args.pairs / cold_s, "warm_over_cold": warm_s / cold_s,
                      "half_over_cold": half_s / cold_s}
        print(f"{name}: cold {cold_s:.2f} s, warm {warm_s:.2f} s, half new {half_s:.2f} s", file=sys.stderr)
    pairs = winrate.judged_pairs([0.5 + 0.4 * ((n % 3) - 1) for n in range(args.pairs)],
                                 [len(m[0]) for m in model], [len(b[0]) for b in baseline], list(range(args.pairs)))
    figures_s, _ = timed(winrate.summary, pairs, resamples=args.resamples, seed=0)

    print(f"\n{args.pairs} pairs (one per prompt), judges of {params / 1e6:.2f}M parameters (hidden {args.hidden}, "
          f"{args.layers} layers, fp32, batch {args.batch_size}), {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}\n")
    print("| judge | load s | cold s | cold pairs/s | warm s (all reused) | warm / cold | half new s | half / cold |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['load_s']:.2f} | {r['cold_s']:.2f} | {r['cold_pairs_per_s']:.0f} | {r['warm_s']:.3f} | "
              f"{r['warm_over_cold']:.3f} | {r['half_s']:.2f} | {r['half_over_cold']:.2f} |")
    print(f"\nfigures alone (win rate, bootstrap interval with {args.resamples} resamples, LC fit): {figures_s:.3f} s")
    if args.json:
        args.json.write_text(json.dumps({"pairs": args.pairs, "params": params, "judges": rows,
                                         "figures_s": figures_s}, indent=2) + "\n")


if __name__ == "__main__":
    main()
