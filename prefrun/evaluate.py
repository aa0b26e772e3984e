"""Evaluation: judged scores of sampled completions on the task's held-out prompts, and preference
metrics (loss, reward accuracy, margin) on held-out pairs of the data."""

from __future__ import annotations

import statistics

import torch
from omegaconf import DictConfig

from prefrun.data import Example, collate
from prefrun.generate import hf_generate
from prefrun.logprobs import sequence_logps


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


@torch.no_grad()
def preference_metrics(model, tokenizer, examples: list[Example], *, loss_fn, batch_size: int) -> dict:
    """The loss, reward accuracy and margin on held-out pairs (reference log-probs attached)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = {"loss": 0.0, "rewards/accuracy": 0.0, "rewards/margin": 0.0}
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
        logps = sequence_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                               batch["completion_mask"].to(device)).view(batch["completion_lengths"].shape).cpu()
        losses, rewards = loss_fn(logps, batch["reference_logps"], batch["completion_lengths"])
        hardest = rewards[:, 1:].max(dim=1).values
        totals["loss"] += losses.sum().item()
        totals["rewards/accuracy"] += (rewards[:, 0] > hardest).sum().item()
        totals["rewards/margin"] += (rewards[:, 0] - hardest).sum().item()
    model.train(was_training)
    return {**{k: v / len(examples) for k, v in totals.items()}, "num_pairs": len(examples)}
