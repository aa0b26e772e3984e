"""Evaluation: judged scores of sampled completions on the task's held-out prompts, and preference
metrics (loss, reward accuracy, margin) on held-out pairs of the data."""

from __future__ import annotations

import dataclasses
import statistics

import torch
from omegaconf import DictConfig

from prefrun import distributed, faults, winrate
from prefrun.data import Example, split_candidate_logps
from prefrun.generate import HFGenerator
from prefrun.judgments import JudgmentCache
from prefrun.losses import pool_log_softmax_loss


def judged_scores(model, tokenizer, prompts: list, judge, cfg: DictConfig, seed: int,
                  baseline: dict | None = None, judgments: JudgmentCache | None = None, engine=None) -> dict:
    """For each decoding in `cfg.decodings`: completions of the held-out `prompts` judged by `judge`, as mean
    ± stderr over prompts of the per-prompt mean score. The start (`baseline` None) also keeps its completions
    (`completions`, left out of what a run writes to summary.json: `without_completions`). With `baseline`, the
    start's results, also the pairwise comparison with it, `vs_start`: the i-th sample of each prompt against
    the start's i-th, through `judge.compare` (and the judgment cache `judgments`): the win rate with its 95%
    interval over prompts, the hard and the length-controlled win rate (winrate.summary); and
    `prompts_above_start`, the share of prompts whose mean score beats the start's (ties count half).
    The prompts are cut in shards of `cfg.batch_size`, each sampled with its own seed (shard 0: `seed`) and
    judged by one process: the scores do not depend on the number of processes. `engine`: a generator whose
    engine already serves `model`'s weights (a synced persistent vLLM engine) samples instead of HF `generate`
    in this process, with each decoding's settings; results name the backend (`generator`). A sharded `model`
    (FSDP2, ZeRO-3) runs collectives: the shards stay split and each HF generate() call is a step that the
    processes make together (`distributed.map_shards_in_step`)."""
    results = {}
    size = cfg.batch_size
    policy_free = engine is not None and not getattr(judge, "judges_with_the_policy", False)
    split = policy_free or not distributed.is_sharded(model)
    in_step = engine is None and distributed.is_sharded(model) and distributed.world_size() > 1
    num_shards = distributed.num_shards(len(prompts), size)
    for name, decoding in cfg.decodings.items():
        settings = {"num_candidates": decoding.num_samples, "temperature": decoding.temperature,
                    "top_p": decoding.top_p, "max_new_tokens": cfg.max_new_tokens, "stop": [], "min_new_tokens": 0}

        def chunk_of(shard: int) -> list:
            return prompts[shard * size : (shard + 1) * size]

        def sample(shard: int, settings=settings) -> list[list[str]]:
            shard_settings = {**settings, "seed": distributed.shard_seed(seed, shard)}
            generator = HFGenerator(**shard_settings, batch_size=size) if engine is None else \
                dataclasses.replace(engine, **shard_settings)  # a copy shares the engine
            return [c.texts for c in generator.generate(chunk_of(shard), model=model, tokenizer=tokenizer)]

        def complete_and_judge(shard: int, completions: list | None = None) -> tuple[list, list]:
            faults.inject("evaluate")
            completions = sample(shard) if completions is None else completions
            return completions, judge.score(chunk_of(shard), completions)

        def sample_wave(wave: list[int], settings=settings) -> dict[int, list]:
            """The main process's engine samples the wave's shards for every process (generator.engines=main); each
            process receives its own shard's samples."""
            sets = dataclasses.replace(engine, **settings).generate_many(
                [chunk_of(shard) for shard in wave], model=model, tokenizer=tokenizer,
                to=[distributed.owner(shard) for shard in wave],
                variants=[{"seed": distributed.shard_seed(seed, shard)} for shard in wave])
            return {shard: [c.texts for c in candidates] for shard, candidates in zip(wave, sets)
                    if candidates is not None}

        if split and getattr(engine, "fed_by_main", False):
            shards = distributed.map_waves(num_shards, sample_wave, complete_and_judge)
        elif in_step:  # one generate() call a shard (a shard is one batch); the judge's errors wait for the steps
            distributed.together(judge.load)  # before the steps, not inside one
            shards = distributed.map_shards_in_step(
                num_shards, sample, then=complete_and_judge, steps=lambda shard: 1,
                idle=lambda: HFGenerator(batch_size=size).idle(model, tokenizer), model=model)
        else:
            shards = distributed.map_shards(num_shards, complete_and_judge, split=split)
        completions = [row for part, _ in shards for row in part]
        scores = [row for _, part in shards for row in part]
        per_prompt = [statistics.fmean(row) for row in scores]
        results[name] = {
            "mean": statistics.fmean(per_prompt),
            "stderr": statistics.stdev(per_prompt) / len(per_prompt) ** 0.5 if len(per_prompt) > 1 else 0.0,
            "judge": judge.name,
            "relative": bool(getattr(judge, "relative", False)),  # a mean of 0.5 by construction: see vs_start
            "num_prompts": len(prompts),
            "decoding": dict(decoding),
            "generator": "hf" if engine is None else "vllm",
            **({} if engine is None else {"weight_version": engine.sync_stats.get("sync/weight_version")}),
            "per_prompt": per_prompt,
            "examples": [{"prompt": p, "completion": g[0], "score": row[0]}
                         for p, g, row in zip(prompts[: cfg.num_examples], completions, scores)],
        }
        start = (baseline or {}).get(name)
        if start is None:
            results[name]["completions"] = completions
            continue
        pairs = list(zip(per_prompt, start["per_prompt"]))
        results[name]["prompts_above_start"] = statistics.fmean((a > b) + 0.5 * (a == b) for a, b in pairs)
        if "completions" in start:  # (a start evaluated before pairwise comparisons existed has none)
            results[name]["vs_start"] = compare_with_start(prompts, completions, start["completions"], judge,
                                                           judgments or JudgmentCache(None), seed,
                                                           resamples=cfg.get("interval_resamples", 1000))
    return results


def compare_with_start(prompts: list, completions: list[list[str]], start: list[list[str]], judge,
                       judgments: JudgmentCache, seed: int, *, resamples: int) -> dict:
    """The i-th completion of each prompt against the start's i-th: winrate.summary of the judge's verdicts."""
    rows = [(n, a, b) for n, (mine, theirs) in enumerate(zip(completions, start)) for a, b in zip(mine, theirs)]
    verdicts, counts = judgments.compare(judge, [prompts[n] for n, _, _ in rows], [a for _, a, _ in rows],
                                         [b for _, _, b in rows])
    pairs = winrate.judged_pairs(verdicts.preference, [len(a) for _, a, _ in rows], [len(b) for _, _, b in rows],
                                 [n for n, _, _ in rows], forward=verdicts.forward, backward=verdicts.backward)
    return {**winrate.summary(pairs, resamples=resamples, seed=seed), "judged_pairs": counts["judged"]}


def without_completions(results: dict) -> dict:
    """`judged_scores` results as summary.json keeps them: without the start's completions (which may be large)."""
    return {name: {k: v for k, v in result.items() if k != "completions"} for name, result in results.items()}


@torch.no_grad()
def preference_metrics(model, tokenizer, examples: list[Example], *, loss_fn, beta: float, batch_size: int) -> dict:
    """The loss, reward accuracy (y_w's reward above every other candidate's) and margin (over the best
    other) on held-out examples with reference log-probs attached. Pairs are scored with the training loss;
    pools with the whole-pool log-softmax, whatever the loss form (comparable across MC-PO runs)."""
    logps, lengths = split_candidate_logps(model, examples, tokenizer.pad_token_id, batch_size=batch_size * 2)
    reference = torch.zeros_like(logps)
    for i, example in enumerate(examples):
        reference[i, : len(example.reference_logps)] = torch.tensor(example.reference_logps)
    if logps.shape[1] == 2 and examples[0].scores is None:
        losses, rewards = loss_fn(logps, reference, lengths)
    else:
        rewards = (beta * (logps - reference)).masked_fill(lengths == 0, float("-inf"))
        losses = pool_log_softmax_loss(rewards)
    best_other = rewards[:, 1:].max(dim=1).values
    return {"loss": losses.mean().item(), "rewards/accuracy": (rewards[:, 0] > best_other).float().mean().item(),
            "rewards/margin": (rewards[:, 0] - best_other).mean().item(), "num_examples": len(examples)}
