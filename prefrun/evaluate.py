"""Judged evaluation: sample completions for held-out task prompts and score them with the task's judge."""

from __future__ import annotations

import statistics

from omegaconf import DictConfig

from prefrun.generate import hf_generate


def judged_scores(model, tokenizer, task, cfg: DictConfig, seed: int) -> dict:
    """For each decoding in `cfg.decodings`: mean ± stderr over prompts of the per-prompt mean score."""
    prompts = task.prompts("eval", cfg.num_prompts)
    results = {}
    for name, decoding in cfg.decodings.items():
        completions = hf_generate(model, tokenizer, prompts, num_samples=decoding.num_samples,
                                  temperature=decoding.temperature, top_p=decoding.top_p,
                                  max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=seed)
        per_prompt = [statistics.fmean(task.score(p, c) for c in group) for p, group in zip(prompts, completions)]
        results[name] = {
            "mean": statistics.fmean(per_prompt),
            "stderr": statistics.stdev(per_prompt) / len(per_prompt) ** 0.5 if len(per_prompt) > 1 else 0.0,
            "exact": statistics.fmean(task.score(p, c) == 1.0 for p, g in zip(prompts, completions) for c in g),
            "num_prompts": len(prompts),
            "decoding": dict(decoding),
            "examples": [{"prompt": p, "completion": g[0], "score": task.score(p, g[0])}
                         for p, g in zip(prompts[: cfg.num_examples], completions[: cfg.num_examples])],
        }
    return results
