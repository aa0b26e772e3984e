"""Samplers choose which candidate completions enter the loss as negatives at each step.

Pair data carries its negative (`dataset`: plain DPO). For MC-PO each prompt carries a pool of K scored
candidates, column 0 the chosen y_w (the judge's best), and the negatives are drawn from the pool under the
current policy (docs/algorithms.md, "MC-PO"). The math is in pure tensor functions with one signature,

    (scores [B, K], chosen_index [B], num_negatives, ..., generator) -> indices [B, M] into the pool,

so that the training loop and the exact testbed (prefrun/testbed.py) call the same code. A score of −inf
marks a candidate that is not there (pools of different sizes are padded). The sampler classes below are
what `conf/sampler/*.yaml` instantiate: their settings, the score the kernel uses, and `draw`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prefrun.errors import InputError


def _check(scores: Tensor, chosen_index: Tensor) -> None:
    if scores.dim() != 2:
        raise InputError(f"sampler: scores must be [batch, pool size], got shape {tuple(scores.shape)}")
    if chosen_index.shape != scores.shape[:1]:
        raise InputError(f"sampler: chosen_index must be [batch] = [{scores.shape[0]}], got {tuple(chosen_index.shape)}")


def _candidates(scores: Tensor, chosen_index: Tensor, num_negatives: int, *, include_chosen: bool,
                replacement: bool) -> Tensor:
    """The scores of the candidates a draw may return (the chosen one set to −inf unless included), after
    checking that every row offers enough of them for M draws."""
    _check(scores, chosen_index)
    masked = scores if include_chosen else scores.scatter(1, chosen_index.long().unsqueeze(1), float("-inf"))
    available = int(torch.isfinite(masked).sum(1).min()) if scores.shape[0] else num_negatives
    needed = min(num_negatives, 1) if replacement else num_negatives
    if num_negatives < 0 or available < needed:
        where = "" if include_chosen else " besides the chosen one"
        raise InputError(f"sampler.num_negatives={num_negatives} but a pool offers only {available} candidates{where}; "
                         "lower num_negatives, draw with replacement, or generate larger pools")
    return masked


def cd_negatives(scores: Tensor, chosen_index: Tensor, num_negatives: int, temperature: float = 1.0,
                 replacement: bool = False, include_chosen: bool = False,
                 generator: torch.Generator | None = None) -> Tensor:
    """Contrastive-divergence negatives: M draws with probability softmax(scores / τ) over the pool (less the
    chosen one unless `include_chosen`). Without replacement the draws are sequential (each over what is
    left, via Gumbel-top-M); with replacement they are i.i.d. and may repeat.

    With replacement, the chosen one included and τ = 1 this is self-normalised importance resampling of the
    pool towards p_θ ∝ π_ref·exp(r_θ): the draws the `mcpo_cd` loss needs to keep the whole-pool gradient in
    expectation. τ → 0 approaches `hardest_negatives`, τ → ∞ `random_negatives`. Returns [B, M] in draw order.
    """
    if temperature <= 0:
        raise InputError(f"sampler.temperature must be > 0, got {temperature}")
    masked = _candidates(scores, chosen_index, num_negatives, include_chosen=include_chosen, replacement=replacement)
    if replacement:
        if num_negatives == 0:
            return torch.zeros((scores.shape[0], 0), dtype=torch.long, device=scores.device)
        probs = torch.softmax(masked / temperature, dim=1)
        return torch.multinomial(probs, num_negatives, replacement=True, generator=generator)
    uniform = torch.rand(masked.shape, generator=generator, dtype=masked.dtype, device=masked.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(masked.dtype).tiny)))
    return torch.topk(masked / temperature + gumbel, num_negatives, dim=1).indices


def random_negatives(scores: Tensor, chosen_index: Tensor, num_negatives: int, replacement: bool = False,
                     include_chosen: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """M negatives uniformly from the pool (less the chosen one unless `include_chosen`): the baseline CD is
    compared with. `scores` only marks which candidates exist (−inf: absent); their values are ignored."""
    present = torch.where(torch.isfinite(scores), torch.zeros_like(scores), scores)
    return cd_negatives(present, chosen_index, num_negatives, replacement=replacement, include_chosen=include_chosen,
                        generator=generator)


def hardest_negatives(scores: Tensor, chosen_index: Tensor, num_negatives: int,
                      generator: torch.Generator | None = None) -> Tensor:
    """The M highest-scoring candidates besides the chosen one, highest first (deterministic; `generator`
    is accepted so that every sampler has the same signature)."""
    masked = _candidates(scores, chosen_index, num_negatives, include_chosen=False, replacement=False)
    return torch.topk(masked, num_negatives, dim=1).indices


def lowest_negatives(scores: Tensor, chosen_index: Tensor, num_negatives: int,
                     generator: torch.Generator | None = None) -> Tensor:
    """The M lowest-scoring candidates besides the chosen one, lowest first. Given the judge's scores this is
    the usual best-vs-worst pair (M = 1) of offline DPO on pools."""
    masked = _candidates(scores, chosen_index, num_negatives, include_chosen=False, replacement=False)
    flipped = torch.where(torch.isfinite(masked), -masked, masked)
    return torch.topk(flipped, num_negatives, dim=1).indices


def effective_sample_size(scores: Tensor, temperature: float = 1.0) -> Tensor:
    """Kish's effective sample size (Σw)²/Σw² of the weights softmax(scores/τ) over each row's candidates
    (−inf: absent): K when the weights are uniform, 1 when one candidate takes all the mass. [B]"""
    weights = torch.softmax(scores / temperature, dim=1)
    return 1.0 / weights.square().sum(1)


def rank_under(scores: Tensor, indices: Tensor) -> Tensor:
    """The rank (1 = highest) that each drawn candidate has among its row's candidates under `scores`. [B, M]"""
    drawn = scores.gather(1, indices)
    return (scores.unsqueeze(1) > drawn.unsqueeze(2)).sum(2) + 1


# -- what conf/sampler/*.yaml instantiate ---------------------------------------------------------------


@dataclass
class DatasetSampler:
    """Every negative the example carries, in order (pairs: the rejected one; pools: the whole pool), and
    no scoring pass. Column 0 is the chosen completion."""

    uses_pools = False

    def columns(self, num_candidates: int) -> list[int]:
        return list(range(num_candidates))


@dataclass
class PoolSampler:
    """Draws `num_negatives` (M) negatives per step from each prompt's pool of candidates.

    `score` is what the kernel ranks candidates by, computed by a no-grad forward of the current policy over
    the pool: `reward` = r_θ = β·(log π_θ − log π_ref) (the default), `logp` = log π_θ (divided by the length
    if `length_normalize`). A pool's scores are recomputed when they are older than `refresh_every`
    optimiser steps (1: every visit; 0: scored once, at the first visit, and never again).
    """

    num_negatives: int = 2
    score: str = "reward"
    length_normalize: bool = False
    refresh_every: int = 1

    uses_pools = True
    name = "pool"

    def __post_init__(self) -> None:
        if self.score not in ("reward", "logp"):
            raise InputError(f"sampler.score={self.score!r}: choose reward (β·log-ratio) or logp (log π_θ)")
        if self.num_negatives < 1:
            raise InputError(f"sampler.num_negatives={self.num_negatives}: draw at least one negative")
        if self.refresh_every < 0:
            raise InputError(f"sampler.refresh_every={self.refresh_every}: give 0 (score once) or a number of steps")

    def kernel_scores(self, policy_logps: Tensor, reference_logps: Tensor, lengths: Tensor, beta: float) -> Tensor:
        """What the sampler ranks by, [B, K]; padding (length 0) is −inf."""
        if self.score == "reward":
            scores = beta * (policy_logps - reference_logps)
        else:
            scores = policy_logps / lengths.clamp(min=1) if self.length_normalize else policy_logps.clone()
        return scores.masked_fill(lengths == 0, float("-inf"))

    def draw(self, scores: Tensor, judge_scores: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    @property
    def temperature_for_ess(self) -> float:
        return 1.0


@dataclass
class CDSampler(PoolSampler):
    """Contrastive divergence: draws ∝ softmax(score/τ). `replacement` and `include_chosen` choose between
    the `mcpo_cd` form (both on: importance resampling of the whole pool) and the paper's reading of
    negatives drawn from the pool less y_w (both off)."""

    temperature: float = 1.0
    replacement: bool = True
    include_chosen: bool = True
    name = "cd"

    def draw(self, scores: Tensor, judge_scores: Tensor, generator: torch.Generator) -> Tensor:
        return cd_negatives(scores, _zeros(scores), self.num_negatives, self.temperature, self.replacement,
                            self.include_chosen, generator)

    @property
    def temperature_for_ess(self) -> float:
        return self.temperature


@dataclass
class RandomSampler(PoolSampler):
    """Uniform draws from the pool (less the chosen one unless `include_chosen`)."""

    replacement: bool = False
    include_chosen: bool = False
    name = "random"

    def draw(self, scores: Tensor, judge_scores: Tensor, generator: torch.Generator) -> Tensor:
        return random_negatives(scores, _zeros(scores), self.num_negatives, self.replacement, self.include_chosen,
                                generator)


@dataclass
class HardestSampler(PoolSampler):
    """The M candidates the current score ranks highest, besides the chosen one."""

    name = "hardest"

    def draw(self, scores: Tensor, judge_scores: Tensor, generator: torch.Generator) -> Tensor:
        return hardest_negatives(scores, _zeros(scores), self.num_negatives)


@dataclass
class RewardSampler(PoolSampler):
    """The M candidates the judge scored lowest (M = 1: the usual best-vs-worst pair). Needs no policy score;
    the pool is still scored for the logged whole-pool loss and the hardness metrics."""

    name = "reward"

    def draw(self, scores: Tensor, judge_scores: Tensor, generator: torch.Generator) -> Tensor:
        present = judge_scores.masked_fill(~torch.isfinite(scores), float("-inf"))  # padding is never "worst"
        return lowest_negatives(present, _zeros(judge_scores), self.num_negatives)


def _zeros(scores: Tensor) -> Tensor:
    return torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)


# Pairings of loss and sampler that keep the optimum π** as a fixed point on the exact testbed (docs/testbed.md,
# section e, measures every loss × sampler): any other pairing still runs, with the warning below.
CONSISTENT = {
    # i.i.d. draws ∝ softmax(r_θ) from the whole pool, y_w included, τ = 1: the whole-pool gradient in expectation
    # (τ ≠ 1 moves the fixed point to π_ref·exp(τ·r*/β)/Z, score=logp to exp(r*)/Z)
    "mcpo_cd_loss": lambda s: isinstance(s, CDSampler) and s.replacement and s.include_chosen and s.temperature == 1
    and s.score == "reward",
    # the whole pool, or uniform draws exchangeable with y_w: without replacement from the pool less y_w, or with
    # replacement from the whole pool (the two mixed switches are biased, if slightly)
    "mcpo_loss": lambda s: isinstance(s, DatasetSampler)
    or (isinstance(s, RandomSampler) and s.replacement == s.include_chosen),
}


def bias_warning(loss_name: str, sampler) -> str | None:
    """One line when `loss_name` with `sampler` is a pairing the testbed measured as biased, else None."""
    consistent = CONSISTENT.get(loss_name)
    if consistent is None or consistent(sampler):
        return None
    pick = ("sampler=cd (replacement and include_chosen on, temperature 1, score reward)"
            if loss_name == "mcpo_cd_loss" else
            "sampler=random (replacement and include_chosen both off, its defaults, or both on) or sampler=dataset, "
            "or loss=mcpo_cd with sampler=cd")
    settings = _describe(sampler)
    return (f"loss={loss_name.removesuffix('_loss')} with sampler={getattr(sampler, 'name', 'dataset')}"
            f"{f' ({settings})' if settings else ''} does not keep the optimum π** as a fixed point on the exact "
            f"testbed (docs/testbed.md, section e): its gradient is biased. It runs as asked; for a consistent pairing "
            f"use {pick}")


def _describe(sampler) -> str:
    keys = [k for k in ("temperature", "replacement", "include_chosen", "score") if hasattr(sampler, k)]
    return ", ".join(f"{k}={getattr(sampler, k)}" for k in keys)
