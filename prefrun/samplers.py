"""Samplers choose which candidate completions enter the loss as negatives at each step.

The `dataset` sampler takes the negatives as the data gives them (plain DPO on pairs). For MC-PO each
prompt carries a pool of K scored candidates and the negatives are drawn from the pool minus the chosen
one (shared/ALGORITHMS.md, "Contrastive-divergence (CD) sampler"). Those samplers are pure tensor
functions with one signature, `(scores [B, K], chosen_index [B], num_negatives, ..., generator) ->
indices [B, M]`, so that the training loop and the exact testbed (prefrun/testbed.py) call the same code
and a config can swap one for another. A score of −inf marks a candidate that is not there (padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prefrun.errors import InputError


@dataclass
class DatasetSampler:
    """Every negative the example carries, in order: column 0 is the chosen completion."""

    def columns(self, num_candidates: int) -> list[int]:
        return list(range(num_candidates))


def _pool_without_chosen(scores: Tensor, chosen_index: Tensor, num_negatives: int) -> Tensor:
    """The scores with the chosen candidate set to −inf, after checking that M negatives exist in every row."""
    if scores.dim() != 2:
        raise InputError(f"sampler: scores must be [batch, pool size], got shape {tuple(scores.shape)}")
    if chosen_index.shape != scores.shape[:1]:
        raise InputError(f"sampler: chosen_index must be [batch] = [{scores.shape[0]}], got {tuple(chosen_index.shape)}")
    masked = scores.scatter(1, chosen_index.long().unsqueeze(1), float("-inf"))
    available = int(torch.isfinite(masked).sum(1).min()) if scores.shape[0] else num_negatives
    if not 0 <= num_negatives <= available:
        raise InputError(f"sampler.num_negatives={num_negatives} but a pool offers only {available} candidates "
                         "besides the chosen one; lower num_negatives or generate larger pools")
    return masked


def cd_negatives(scores: Tensor, chosen_index: Tensor, num_negatives: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
    """Contrastive-divergence negatives: M draws without replacement from the pool minus the chosen one,
    each with probability softmax(scores / τ) over what is left (sequential sampling, via Gumbel-top-M).

    Scoring the pool with the current policy makes the negatives approximate samples of the model
    p_θ(y|x) ∝ π_ref·exp(r_θ), which is what the normaliser's gradient needs (paper 000). τ → 0 gives
    `hardest_negatives`, τ → ∞ `random_negatives`. Returns indices [B, M] into the pool, in draw order.
    """
    if temperature <= 0:
        raise InputError(f"sampler.temperature must be > 0, got {temperature}")
    masked = _pool_without_chosen(scores, chosen_index, num_negatives)
    uniform = torch.rand(masked.shape, generator=generator, dtype=masked.dtype, device=masked.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(masked.dtype).tiny)))
    return torch.topk(masked / temperature + gumbel, num_negatives, dim=1).indices


def random_negatives(scores: Tensor, chosen_index: Tensor, num_negatives: int,
                     generator: torch.Generator | None = None) -> Tensor:
    """M negatives uniformly without replacement from the pool minus the chosen one (the baseline CD is
    compared with). `scores` only marks which candidates exist (−inf: absent); their values are ignored."""
    present = torch.where(torch.isfinite(scores), torch.zeros_like(scores), scores)
    return cd_negatives(present, chosen_index, num_negatives, generator=generator)


def hardest_negatives(scores: Tensor, chosen_index: Tensor, num_negatives: int,
                      generator: torch.Generator | None = None) -> Tensor:
    """The M highest-scoring candidates besides the chosen one, highest first (deterministic; `generator`
    is accepted so that every sampler has the same signature)."""
    masked = _pool_without_chosen(scores, chosen_index, num_negatives)
    return torch.topk(masked, num_negatives, dim=1).indices
