"""Preference losses as pure functions of log-prob tensors (formulas: docs/algorithms.md).

Every loss takes
    policy_logps     [B, C]  log π_θ(y|x) summed over completion tokens; column 0 is the chosen y_w,
    reference_logps  [B, C]  the same under π_ref,
    completion_lengths [B, C] number of completion tokens |y|,
and returns (losses [B], rewards [B, C]) with rewards = β·(log π_θ − log π_ref), the implicit reward.
No models, no batches, no I/O: adding a loss is one function here plus one yaml in conf/loss/.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prefrun.errors import InputError


def _check_pairs(policy_logps: Tensor, name: str) -> None:
    if policy_logps.dim() != 2 or policy_logps.shape[1] != 2:
        raise InputError(
            f"loss={name} needs exactly one negative per prompt (logps of shape [B, 2]), got "
            f"{tuple(policy_logps.shape)}; use loss=mcpo for several negatives"
        )


def _nll(policy_logps: Tensor, completion_lengths: Tensor) -> Tensor:
    """Length-normalised negative log-likelihood of the chosen completion, −log π_θ(y_w|x)/|y_w|."""
    return -policy_logps[:, 0] / completion_lengths[:, 0].clamp(min=1)


def dpo_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    completion_lengths: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    nll_weight: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """DPO: −(1−ε)·log σ(Δ) − ε·log σ(−Δ) + nll_weight·NLL, with Δ = r_θ(x,y_w) − r_θ(x,y_l)."""
    _check_pairs(policy_logps, "dpo")
    rewards = beta * (policy_logps - reference_logps)
    margin = rewards[:, 0] - rewards[:, 1]
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    if nll_weight:
        losses = losses + nll_weight * _nll(policy_logps, completion_lengths)
    return losses, rewards


def ipo_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    completion_lengths: Tensor,
    *,
    beta: float,
    nll_weight: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """IPO: (h − 1/(2β))², h = Δ/β the difference of the policy/reference log-ratios (summed log-probs)."""
    _check_pairs(policy_logps, "ipo")
    log_ratios = policy_logps - reference_logps
    losses = (log_ratios[:, 0] - log_ratios[:, 1] - 1 / (2 * beta)) ** 2
    if nll_weight:
        losses = losses + nll_weight * _nll(policy_logps, completion_lengths)
    return losses, beta * log_ratios


def mcpo_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    completion_lengths: Tensor,
    *,
    beta: float,
    nll_weight: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """MC-PO: −log softmax([r_w, r_1, …, r_M])[0]; with M = 1 it is exactly DPO."""
    rewards = beta * (policy_logps - reference_logps)
    losses = -torch.log_softmax(rewards, dim=1)[:, 0]
    if nll_weight:
        losses = losses + nll_weight * _nll(policy_logps, completion_lengths)
    return losses, rewards


def mcpo_cd_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    completion_lengths: Tensor,
    *,
    beta: float,
    nll_weight: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """MC-PO, contrastive-divergence form: −r_w + (1/M)·Σ_j r_j over M draws y_j (columns 1..M).

    The draws must come from the whole pool, y_w included, with replacement, ∝ softmax(r_θ) computed without
    gradient (`sampler=cd`): then the expected gradient is that of the whole-pool log-softmax
    −log softmax(r_pool)[w], while only 1 + M sequences need a backward pass. A draw that is y_w itself
    cancels its share of −r_w, so the loss stops pushing once the policy puts its mass on y_w. The value is
    a surrogate (it can be negative); the training loop logs the whole-pool log-softmax as `loss`."""
    if policy_logps.dim() != 2 or policy_logps.shape[1] < 2:
        raise InputError(f"loss=mcpo_cd needs the chosen completion and at least one draw (logps [B, 1 + M]), got "
                         f"{tuple(policy_logps.shape)}")
    rewards = beta * (policy_logps - reference_logps)
    losses = -rewards[:, 0] + rewards[:, 1:].mean(dim=1)
    if nll_weight:
        losses = losses + nll_weight * _nll(policy_logps, completion_lengths)
    return losses, rewards


def pool_log_softmax_loss(rewards: Tensor, chosen_index: int = 0) -> Tensor:
    """−log softmax(r_pool)[w] over each row's whole pool (−inf entries: absent candidates): the NLL of y_w
    under p_θ restricted to the pool, which MC-PO estimates. Comparable across samplers and loss forms. [B]"""
    return -torch.log_softmax(rewards, dim=1)[:, chosen_index]


def log_reference_noise(reference_logps: Tensor, beta: float) -> Tensor:
    """log γ = β·(log π_ref(y_l|x) − log π_ref(y_w|x)) per pair (paper 001, eq. 12); > 0 when the
    reference already prefers the loser. With several negatives, the first one is used."""
    return beta * (reference_logps[:, 1] - reference_logps[:, 0])
