"""APO's extrapolation step as pure tensor functions (paper 004: Accelerated Preference Optimization, arXiv 2410.06293).

APO runs iterative DPO and, after round t produced π̂_{t+1}, extrapolates with momentum α over the
*un-extrapolated* iterates (docs/algorithms.md, "APO"):
    exact, in log-probability space:  log π_{t+1} = log π̂_{t+1} + α·(log π̂_{t+1} − log π̂_t) − log Z
    approximate, in parameter space:  θ_{t+1} = θ̂_{t+1} + α·(θ̂_{t+1} − θ̂_t)
The two agree exactly for softmax-linear policies (log π is linear in θ up to the normaliser); for
other models the second is an approximation of the first. The exact testbed (prefrun/testbed.py)
measures how far apart they are; the LLM path calls `extrapolate_parameters`. α = 0 returns π̂_{t+1}.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from prefrun.errors import InputError


def extrapolate_logprobs(log_pi_hat_new: Tensor, log_pi_hat_prev: Tensor, alpha: float) -> Tensor:
    """The paper's exact APO update: log π̂_new + α·(log π̂_new − log π̂_prev), renormalised over the last
    dim (the responses of a prompt), so the result is again a log-distribution.

    Both inputs are log-probabilities over the same finite response set, shape [..., K], and must be
    finite: a response with zero probability in either iterate has no defined momentum.
    """
    if log_pi_hat_new.shape != log_pi_hat_prev.shape:
        raise InputError(f"apo: log-prob shapes differ: {tuple(log_pi_hat_new.shape)} vs {tuple(log_pi_hat_prev.shape)}")
    if not (torch.isfinite(log_pi_hat_new).all() and torch.isfinite(log_pi_hat_prev).all()):
        raise InputError("apo: log-space extrapolation needs finite log-probs (every response with probability > 0)")
    logits = log_pi_hat_new + alpha * (log_pi_hat_new - log_pi_hat_prev)
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def extrapolate_parameters(new: Tensor | Mapping[str, Tensor], prev: Tensor | Mapping[str, Tensor],
                           alpha: float) -> Tensor | dict[str, Tensor]:
    """The parameter-space APO update θ̂_new + α·(θ̂_new − θ̂_prev), for one tensor or a state dict.

    Non-floating entries of a state dict (step counters, integer buffers) are taken from `new` unchanged.
    With LoRA pass the merged weights (or ΔW = B·A), never A and B separately: B·A is bilinear, so
    extrapolating the factors is not a linear extrapolation of the weights.
    """
    if isinstance(new, Tensor) and isinstance(prev, Tensor):
        if new.shape != prev.shape:
            raise InputError(f"apo: parameter shapes differ: {tuple(new.shape)} vs {tuple(prev.shape)}")
        return new + alpha * (new - prev) if new.is_floating_point() else new.clone()
    if isinstance(new, Mapping) and isinstance(prev, Mapping):
        if new.keys() != prev.keys():
            missing = sorted(set(new) ^ set(prev))
            raise InputError(f"apo: the two state dicts hold different parameters: {missing[:5]}")
        return {name: extrapolate_parameters(value, prev[name], alpha) for name, value in new.items()}
    raise InputError(f"apo: extrapolate two tensors or two state dicts, got {type(new).__name__} and {type(prev).__name__}")
