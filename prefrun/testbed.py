"""The exact testbed: a finite contextual bandit on which the claims behind prefrun can be checked exactly.

On a real LLM nobody can tell whether a preference-optimisation run is right or merely plausible. Here
prompts and responses are finite, the reward r* and the reference π_ref are known, and preference data are
Bradley–Terry draws from them, so every optimum is computable (float64 throughout):

    (a) `dpo_optimum`      unconstrained DPO recovers π** = π_ref·exp(r*/β)/Z
    (b) `constrained_dpo`  Proposition 3.1 of Wipf et al.: under a constraint DPO ≡ forward KL, RLHF ≡ reverse KL
    (c) `reference_noise`  the same paper, §5: the reference noise γ against the per-pair gradient scale
    (d) `apo`              iterative DPO as proximal steps against APO's extrapolation (log and parameter space)
    (e) `mcpo`             MC-PO: the normaliser estimate against M, and which loss × sampler keeps π**

Every loss, sampler and extrapolation is the function the LLM path calls (prefrun.losses, prefrun.samplers,
prefrun.extrapolate). For a tabular policy the "sequence log-prob" of a response is one table entry, so the losses
get [B, C] log-probs with completion lengths of one; a population (infinite-data) loss is the exact expectation,
a weighted sum of the same per-pair losses over every (prompt, winner, loser). `run` is `prefrun testbed`:
it runs (a)–(e) and writes the markdown report and its plots (the second half of this file).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from prefrun.errors import InputError
from prefrun.extrapolate import extrapolate_logprobs, extrapolate_parameters
from prefrun.losses import dpo_loss, log_reference_noise, mcpo_cd_loss, mcpo_loss
from prefrun.samplers import (
    CDSampler,
    DatasetSampler,
    HardestSampler,
    PoolSampler,
    RandomSampler,
    RewardSampler,
    effective_sample_size,
)

log = logging.getLogger("prefrun")

DTYPE = torch.float64  # float32 rounding alone would hide the 1e-8-level agreements checked here
LossFn = Callable[..., tuple[Tensor, Tensor]]  # a prefrun.losses function, hyper-parameters bound
Objective = Callable[[Tensor], Tensor]  # a policy's log-prob table [X, K] -> the scalar to minimise


# ---------------------------------------------------------------------------------------------------------
# The bandit
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bandit:
    """A finite contextual bandit: X prompts, K responses each, everything known exactly."""

    reward: Tensor           # r*(x, y), [X, K]
    reference_logps: Tensor  # log π_ref(y|x), [X, K]
    features: Tensor         # φ(x, y), [X, K, d]: all that linear-softmax and MLP policies see
    prompt_weights: Tensor   # D(x), [X], sums to 1

    def optimal_logps(self, beta: float) -> Tensor:
        """log π** = log π_ref + r*/β − log Z: the RLHF optimum, and the unconstrained DPO minimiser."""
        return torch.log_softmax(self.reference_logps + self.reward / beta, dim=-1)

    def preference(self) -> Tensor:
        """p*(y_i ≻ y_j | x) = σ(r*_i − r*_j) (Bradley–Terry), [X, K, K]."""
        return torch.sigmoid(self.reward[:, :, None] - self.reward[:, None, :])


def make_bandit(*, num_prompts: int, num_responses: int, num_features: int, reward_scale: float,
                feature_share: float, reference_scale: float, seed: int) -> Bandit:
    """A random bandit. r* = scale·(√share·φ·w + √(1 − share)·ε) with w a unit vector, so `feature_share` is
    the part of the reward a linear-softmax policy can express (1: its family contains π**)."""
    if not 0 <= feature_share <= 1:
        raise InputError(f"bandit.feature_share must be in [0, 1], got {feature_share}")
    if num_responses < 2 or num_prompts < 1 or num_features < 1:
        raise InputError(f"bandit: need num_prompts ≥ 1, num_responses ≥ 2 and num_features ≥ 1, got "
                         f"{num_prompts}, {num_responses}, {num_features}")
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_prompts, num_responses, num_features, generator=generator, dtype=DTYPE)
    direction = torch.randn(num_features, generator=generator, dtype=DTYPE)
    noise = torch.randn(num_prompts, num_responses, generator=generator, dtype=DTYPE)
    reward = reward_scale * (math.sqrt(feature_share) * features @ (direction / direction.norm())
                             + math.sqrt(1 - feature_share) * noise)
    reference_logits = reference_scale * torch.randn(num_prompts, num_responses, generator=generator, dtype=DTYPE)
    return Bandit(reward=reward, reference_logps=torch.log_softmax(reference_logits, dim=-1), features=features,
                  prompt_weights=torch.full((num_prompts,), 1 / num_prompts, dtype=DTYPE))


# ---------------------------------------------------------------------------------------------------------
# Preference data, population losses and exact measures
# ---------------------------------------------------------------------------------------------------------


def preference_weights(bandit: Bandit, sampling_logps: Tensor) -> Tensor:
    """The population distribution of a preference record (x, y_w = i, y_l = j), [X, K, K], summing to 1:
    x ~ D, two responses drawn from the sampling policy (ties dropped, as prefrun's data pipeline does),
    the winner by Bradley–Terry on r*."""
    probs = sampling_logps.exp()
    draws = probs[:, :, None] * probs[:, None, :] * (1 - torch.eye(probs.shape[1], dtype=probs.dtype))
    draws = draws / draws.sum(dim=(1, 2), keepdim=True)  # an ordered pair of distinct responses
    # the unordered pair {i, j} has probability 2·draws[i, j]; then i wins with probability p*(i ≻ j)
    return bandit.prompt_weights[:, None, None] * 2 * draws * bandit.preference()


def sample_pairs(weights: Tensor, num_pairs: int, generator: torch.Generator) -> Tensor:
    """`num_pairs` i.i.d. preference records (x, winner, loser) from a [X, K, K] distribution: [N, 3]."""
    flat = torch.multinomial(weights.flatten(), num_pairs, replacement=True, generator=generator)
    return torch.stack(torch.unravel_index(flat, weights.shape), dim=1)


def empirical_weights(pairs: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The empirical distribution of sampled records, [X, K, K]: the finite-data loss is the expected loss
    under it, so one code path serves both."""
    counts = torch.zeros(shape, dtype=DTYPE)
    counts.index_put_(tuple(pairs.T), torch.ones(len(pairs), dtype=DTYPE), accumulate=True)
    return counts / len(pairs)


def pair_columns(table: Tensor, x: Tensor, winner: Tensor, loser: Tensor) -> Tensor:
    """[B, 2] 'sequence log-probs' of (winner, loser) from a [X, K] table; column 0 is the chosen one."""
    return torch.stack([table[x, winner], table[x, loser]], dim=1)


def preference_loss(loss_fn: LossFn, reference_logps: Tensor, weights: Tensor) -> Objective:
    """Σ weight·loss over every (x, y_w, y_l) with weight > 0, through the LLM path's own loss function, as a
    function of the policy's log-prob table: the infinite-data loss for population weights, the finite-data
    one for empirical weights."""
    x, winner, loser = weights.nonzero(as_tuple=True)
    reference = pair_columns(reference_logps, x, winner, loser)
    pair_weights, lengths = weights[x, winner, loser], torch.ones_like(reference)

    def objective(policy_logps: Tensor) -> Tensor:
        losses, _ = loss_fn(pair_columns(policy_logps, x, winner, loser), reference, lengths)
        return (pair_weights * losses).sum()

    return objective


def expected_kl(p_logps: Tensor, q_logps: Tensor, prompt_weights: Tensor) -> Tensor:
    """E_x KL(p(·|x) ‖ q(·|x)), exact."""
    return (prompt_weights * (p_logps.exp() * (p_logps - q_logps)).sum(-1)).sum()


def rlhf_objective(bandit: Bandit, logps: Tensor, beta: float) -> Tensor:
    """The RLHF loss with the true reward, in closed form: E_x[E_{y~π}(−r*) + β·KL(π ‖ π_ref)] (paper 001, eq. 3)."""
    per_prompt = (logps.exp() * (-bandit.reward + beta * (logps - bandit.reference_logps))).sum(-1)
    return (bandit.prompt_weights * per_prompt).sum()


def suboptimality(bandit: Bandit, logps: Tensor) -> float:
    """E_x[max_y r*(x, y) − E_{y~π} r*(x, y)]: the reward a policy leaves on the table (0 = optimal)."""
    per_prompt = bandit.reward.max(-1).values - (logps.exp() * bandit.reward).sum(-1)
    return float((bandit.prompt_weights * per_prompt).sum())


def entropy(logps: Tensor, prompt_weights: Tensor) -> float:
    return float((prompt_weights * -(logps.exp() * logps).sum(-1)).sum())


def max_total_variation(p_logps: Tensor, q_logps: Tensor) -> float:
    """max_x TV(p(·|x), q(·|x)): how far apart two policies are, bounded and blind to log-probs of responses
    whose probability is negligible (where the minimisers are numerically undetermined)."""
    return float((p_logps.exp() - q_logps.exp()).abs().sum(-1).max() / 2)


# ---------------------------------------------------------------------------------------------------------
# Policies and how they are fitted
# ---------------------------------------------------------------------------------------------------------


class TabularPolicy(nn.Module):
    """Unconstrained: one free logit per (prompt, response)."""

    def __init__(self, logps: Tensor):
        super().__init__()
        self.logits = nn.Parameter(logps.detach().clone())

    def forward(self) -> Tensor:
        return torch.log_softmax(self.logits, dim=-1)


class LinearSoftmaxPolicy(nn.Module):
    """π_θ(y|x) ∝ π_base(y|x)·exp(θ·φ(x, y)): a d-dimensional family, a constraint whenever d is smaller than
    what π** needs. θ = 0 is π_base. log π_θ is linear in θ up to the normaliser, which makes APO's
    parameter-space extrapolation exact for it."""

    def __init__(self, base_logps: Tensor, features: Tensor):
        super().__init__()
        self.register_buffer("base_logps", base_logps.detach().clone())
        self.register_buffer("features", features)
        self.theta = nn.Parameter(torch.zeros(features.shape[-1], dtype=features.dtype))

    def forward(self) -> Tensor:
        return torch.log_softmax(self.base_logps + self.features @ self.theta, dim=-1)


class MLPPolicy(nn.Module):
    """π_θ(y|x) ∝ π_base(y|x)·exp(f_θ(φ(x, y))), f a one-hidden-layer tanh network: not log-linear in θ, so
    for it (as for an LLM) APO's parameter-space extrapolation only approximates the log-space one."""

    def __init__(self, base_logps: Tensor, features: Tensor, hidden: int, seed: int):
        super().__init__()
        self.register_buffer("base_logps", base_logps.detach().clone())
        self.register_buffer("features", features)
        generator = torch.Generator().manual_seed(seed)
        self.hidden = nn.Linear(features.shape[-1], hidden, dtype=DTYPE)
        self.out = nn.Linear(hidden, 1, dtype=DTYPE)
        bound = 1 / math.sqrt(features.shape[-1])  # nn.Linear's own initialisation, but from a seeded generator
        with torch.no_grad():
            for tensor in (self.hidden.weight, self.hidden.bias):
                tensor.copy_((2 * torch.rand(tensor.shape, generator=generator, dtype=DTYPE) - 1) * bound)
            self.out.weight.zero_()  # start exactly at π_base
            self.out.bias.zero_()

    def forward(self) -> Tensor:
        return torch.log_softmax(self.base_logps + self.out(torch.tanh(self.hidden(self.features))).squeeze(-1), -1)


def minimise(policy: nn.Module, objective: Objective, *, max_iter: int, weight_decay: float = 0.0,
             trace: Callable[[Tensor], float] | None = None) -> list[float]:
    """Minimise objective(policy()) + weight_decay/2·‖θ‖² with L-BFGS to numerical convergence: on this testbed
    'the minimiser' must be the minimiser, not wherever an optimiser happened to stop. `trace` is evaluated
    at every function evaluation (convergence plots) and its values are returned."""
    parameters = list(policy.parameters())
    optimizer = torch.optim.LBFGS(parameters, lr=1, max_iter=max_iter, max_eval=2 * max_iter, history_size=50,
                                  tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")
    history: list[float] = []

    def closure() -> Tensor:
        optimizer.zero_grad()
        logps = policy()
        value = objective(logps)
        if weight_decay:
            value = value + weight_decay / 2 * sum(p.square().sum() for p in parameters)
        value.backward()
        if trace is not None:
            history.append(trace(logps.detach()))
        return value

    optimizer.step(closure)
    return history


def newton(policy: TabularPolicy, objective: Objective, *, max_iter: int = 50, tolerance: float = 1e-14) -> int:
    """Newton's method with the exact Hessian and a backtracking line search, for a convex objective of a
    tabular policy. The proximal steps of (d) weight a pair by its probability under π_t, which late rounds
    make 1e-10-small: L-BFGS crawls along those directions, Newton lands on the minimiser in a few steps.
    The logits' per-prompt shift is a null direction of the Hessian; the least-squares solve ignores it."""
    shape = policy.logits.shape

    def value(flat: Tensor) -> Tensor:
        return objective(torch.log_softmax(flat.view(shape), dim=-1))

    for iteration in range(max_iter):
        flat = policy.logits.detach().flatten()
        gradient = torch.autograd.functional.jacobian(value, flat)
        if gradient.abs().max() < tolerance:
            return iteration
        hessian = torch.autograd.functional.hessian(value, flat, vectorize=True)
        step = torch.linalg.lstsq(hessian, -gradient[:, None], rcond=1e-15, driver="gelsd").solution.squeeze(1)
        start, slope, size = value(flat), float(gradient @ step), 1.0
        while size > 1e-10 and value(flat + size * step) > start + 1e-4 * size * slope:
            size /= 2
        with torch.no_grad():
            policy.logits.copy_(torch.log_softmax((flat + size * step).view(shape), dim=-1))
    return max_iter


def gradient_descent(policy: nn.Module, objective: Objective, *, steps: int, lr: float) -> None:
    """A fixed number of full-batch gradient steps: the early-stopping constraint of paper 001, §3."""
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        objective(policy()).backward()
        optimizer.step()


# ---------------------------------------------------------------------------------------------------------
# (a) Unconstrained DPO converges to π**
# ---------------------------------------------------------------------------------------------------------


def dpo_optimum(bandit: Bandit, loss_fn: LossFn, *, beta: float, sample_sizes: list[int], max_iter: int,
                seed: int) -> dict:
    """Minimise the loss over a tabular policy (start: π_ref), on the population preference distribution and
    on sampled data sets of growing size, and measure E_x KL(π** ‖ π_θ). For DPO the population minimiser is
    π** itself; the finite-data one approaches it as 1/N once every prompt's comparisons are connected."""
    target = bandit.optimal_logps(beta)
    population = preference_weights(bandit, bandit.reference_logps)

    def fit(weights: Tensor) -> tuple[Tensor, list[float]]:
        policy = TabularPolicy(bandit.reference_logps)
        trace = minimise(policy, preference_loss(loss_fn, bandit.reference_logps, weights), max_iter=max_iter,
                         trace=lambda lp: float(expected_kl(target, lp, bandit.prompt_weights)))
        return policy().detach(), trace

    fitted, population_trace = fit(population)
    generator = torch.Generator().manual_seed(seed)
    sampled = []
    for num_pairs in sample_sizes:
        weights = empirical_weights(sample_pairs(population, num_pairs, generator), tuple(population.shape))
        logps, trace = fit(weights)
        sampled.append({"num_pairs": num_pairs, "kl": float(expected_kl(target, logps, bandit.prompt_weights)),
                        "degenerate_prompts": degenerate_prompts(weights), "trace": trace})
    return {"beta": beta, "kl_reference": float(expected_kl(target, bandit.reference_logps, bandit.prompt_weights)),
            "kl_population": float(expected_kl(target, fitted, bandit.prompt_weights)),
            "max_tv_population": max_total_variation(target, fitted),
            "population_trace": population_trace, "sampled": sampled}


def degenerate_prompts(weights: Tensor) -> int:
    """Prompts whose 'i beat j' graph is not strongly connected: there the unconstrained minimiser of the
    finite-data loss does not exist (a response that never loses is pushed to probability 1)."""
    num_responses = weights.shape[1]
    reach = (weights > 0) | torch.eye(num_responses, dtype=torch.bool)
    for _ in range(max(1, math.ceil(math.log2(num_responses)))):  # transitive closure by repeated squaring
        reach = reach | ((reach.to(DTYPE) @ reach.to(DTYPE)) > 0)
    return int((~reach.all(dim=2).all(dim=1)).sum())


# ---------------------------------------------------------------------------------------------------------
# (b) Proposition 3.1: under a constraint DPO minimises the forward KL, RLHF the reverse KL
# ---------------------------------------------------------------------------------------------------------

PROPOSITION_BETA = 1.0  # the proposition's setting (paper 001, appendix C): λ = β = 1


def proposition_bandit(*, num_prompts: int, num_features: int, reward_scale: float, feature_share: float,
                       seed: int) -> Bandit:
    """The setting of Proposition 3.1: exactly two responses per prompt, each with π_ref = ½, so that
    π_θ(y_w) + π_θ(y_l) = 1, the step that turns the DPO loss into a cross-entropy with π*."""
    return make_bandit(num_prompts=num_prompts, num_responses=2, num_features=num_features,
                       reward_scale=reward_scale, feature_share=feature_share, reference_scale=0.0, seed=seed)


def constrained_dpo(bandit: Bandit, *, gradient_steps: int, lr: float, weight_decay: float, max_iter: int) -> dict:
    """Under each constraint, minimise four objectives, each on its own: the population DPO loss (through
    prefrun.losses.dpo_loss, β = 1, pairs from π_ref), the forward KL E_x KL(π* ‖ π_θ), the RLHF loss with r*
    (exact expectation under π_θ) and the reverse KL E_x KL(π_θ ‖ π*). The proposition says DPO ≡ forward KL
    and RLHF ≡ reverse KL up to constants, so their minimisers coincide under any constraint, while DPO's and
    RLHF's need not."""
    uniform = torch.full_like(bandit.reference_logps, -math.log(2))
    if bandit.reward.shape[1] != 2 or not torch.allclose(bandit.reference_logps, uniform):
        raise InputError("constrained: Proposition 3.1 needs two responses per prompt with π_ref = ½ each")
    target = bandit.optimal_logps(PROPOSITION_BETA)  # π** = π* (the BT-optimal policy) in this setting
    dpo = functools.partial(dpo_loss, beta=PROPOSITION_BETA)
    objectives: dict[str, Objective] = {
        "DPO": preference_loss(dpo, bandit.reference_logps, preference_weights(bandit, bandit.reference_logps)),
        "forward KL": lambda lp: expected_kl(target, lp, bandit.prompt_weights),
        "RLHF": lambda lp: rlhf_objective(bandit, lp, PROPOSITION_BETA),
        "reverse KL": lambda lp: expected_kl(lp, target, bandit.prompt_weights),
    }
    d = bandit.features.shape[-1]
    constraints = {  # name: (a fresh policy, how it is fitted to an objective)
        f"linear-softmax, d = {d}": (
            lambda: LinearSoftmaxPolicy(bandit.reference_logps, bandit.features),
            lambda policy, objective: minimise(policy, objective, max_iter=max_iter)),
        f"tabular, {gradient_steps} gradient steps (lr {lr})": (
            lambda: TabularPolicy(bandit.reference_logps),
            lambda policy, objective: gradient_descent(policy, objective, steps=gradient_steps, lr=lr)),
        f"tabular, weight decay {weight_decay}": (
            lambda: TabularPolicy(bandit.reference_logps),
            lambda policy, objective: minimise(policy, objective, max_iter=max_iter, weight_decay=weight_decay)),
        "none (tabular)": (
            lambda: TabularPolicy(bandit.reference_logps),
            lambda policy, objective: minimise(policy, objective, max_iter=max_iter)),
    }
    rows = []
    for constraint, (build, fit) in constraints.items():
        logps, params = {}, {}
        for name, objective in objectives.items():
            policy = build()
            fit(policy, objective)
            logps[name] = policy().detach()
            params[name] = torch.cat([p.detach().flatten() for p in policy.parameters()])
        both = ("DPO", "RLHF")
        rows.append({
            "constraint": constraint,
            "tv_dpo_forward": max_total_variation(logps["DPO"], logps["forward KL"]),
            "tv_rlhf_reverse": max_total_variation(logps["RLHF"], logps["reverse KL"]),
            "tv_dpo_rlhf": max_total_variation(logps["DPO"], logps["RLHF"]),
            "param_dpo_forward": float((params["DPO"] - params["forward KL"]).abs().max()),
            "param_rlhf_reverse": float((params["RLHF"] - params["reverse KL"]).abs().max()),
            "param_dpo_rlhf": float((params["DPO"] - params["RLHF"]).abs().max()),
            "forward_kl": {k: float(expected_kl(target, logps[k], bandit.prompt_weights)) for k in both},
            "reverse_kl": {k: float(expected_kl(logps[k], target, bandit.prompt_weights)) for k in both},
            "entropy": {k: entropy(logps[k], bandit.prompt_weights) for k in both},
            # mode covering: how far below π* a policy goes anywhere (log π_θ − log π*, the minimum)
            "under_coverage": {k: float((logps[k] - target).min()) for k in both},
            "logps": {k: v.tolist() for k, v in logps.items()},
            "params": {k: v.tolist() for k, v in params.items()},
        })
    return {"target_logps": target.tolist(), "entropy_target": entropy(target, bandit.prompt_weights),
            "rows": rows, "segment": objective_segment(bandit, objectives, rows[0]["params"])}


def objective_segment(bandit: Bandit, objectives: dict[str, Objective], params: dict[str, list[float]]) -> dict:
    """Each objective along the line θ(s) = θ_DPO + s·(θ_RLHF − θ_DPO) of the linear-softmax family, minus its
    own minimum over the family: DPO and forward KL trace one curve, RLHF and reverse KL another."""
    start, end = (torch.tensor(params[k], dtype=DTYPE) for k in ("DPO", "RLHF"))
    policy = LinearSoftmaxPolicy(bandit.reference_logps, bandit.features)
    positions = torch.linspace(-0.5, 1.5, 81, dtype=DTYPE)
    curves = {}
    with torch.no_grad():
        for name, objective in objectives.items():
            policy.theta.copy_(torch.tensor(params[name], dtype=DTYPE))
            minimum = float(objective(policy()))
            curves[name] = []
            for s in positions:
                policy.theta.copy_(start + s * (end - start))
                curves[name].append(float(objective(policy())) - minimum)
    return {"s": positions.tolist(), **curves}


# ---------------------------------------------------------------------------------------------------------
# (c) Paper 001, §5: the reference noise γ against the per-pair gradient scale
# ---------------------------------------------------------------------------------------------------------


def reference_noise(bandit: Bandit, *, beta: float, num_pairs: int, gradient_steps: int, lr: float,
                    seed: int) -> dict:
    """Sample pairs from π_ref, train a linear-softmax policy on them with DPO for a few gradient steps, and
    record per pair log γ = β·(log π_ref(y_l) − log π_ref(y_w)) (prefrun.losses.log_reference_noise) against
    the gradient scale |∂ℓ/∂Δ| that autograd finds through dpo_loss, at the start and at the end. Paper 001
    writes ℓ = log(γ + u) − log γ with u = [π_θ(y_l)/π_θ(y_w)]^β, so the scale must equal u/(γ + u)."""
    generator = torch.Generator().manual_seed(seed)
    pairs = sample_pairs(preference_weights(bandit, bandit.reference_logps), num_pairs, generator)
    x, winner, loser = pairs.T
    reference = pair_columns(bandit.reference_logps, x, winner, loser)
    log_gamma = log_reference_noise(reference, beta)
    margin = bandit.reward[x, winner] - bandit.reward[x, loser]
    dpo = functools.partial(dpo_loss, beta=beta)
    policy = LinearSoftmaxPolicy(bandit.reference_logps, bandit.features)

    def snapshot() -> dict:
        policy_logps = pair_columns(policy().detach(), x, winner, loser).requires_grad_(True)
        losses, _ = dpo(policy_logps, reference, torch.ones_like(policy_logps))
        losses.sum().backward()
        scale = -policy_logps.grad[:, 0] / beta  # ∂ℓ/∂Δ, Δ = β·(log-ratio of y_w − log-ratio of y_l)
        log_u = beta * (policy_logps[:, 1] - policy_logps[:, 0]).detach()
        noisy = log_gamma > 0
        return {"scale": scale.tolist(), "log_u": log_u.tolist(),
                "max_formula_error": float((scale - torch.sigmoid(log_u - log_gamma)).abs().max()),  # u/(γ + u)
                "spearman_gamma": spearman(log_gamma, scale), "spearman_margin": spearman(margin, scale),
                "mean_scale_noisy": float(scale[noisy].mean()), "mean_scale_clean": float(scale[~noisy].mean())}

    start = snapshot()
    empirical = empirical_weights(pairs, tuple(bandit.preference().shape))
    gradient_descent(policy, preference_loss(dpo, bandit.reference_logps, empirical), steps=gradient_steps, lr=lr)
    return {"beta": beta, "num_pairs": num_pairs, "gradient_steps": gradient_steps, "log_gamma": log_gamma.tolist(),
            "margin": margin.tolist(), "fraction_noisy": float((log_gamma > 0).to(DTYPE).mean()),
            "start": start, "end": snapshot()}


def spearman(a: Tensor, b: Tensor) -> float:
    """Rank correlation (no tie correction: the values here are continuous)."""
    ranks = [t.argsort().argsort().to(DTYPE) for t in (a, b)]
    ranks = [r - r.mean() for r in ranks]
    denominator = ranks[0].norm() * ranks[1].norm()
    return float((ranks[0] * ranks[1]).sum() / denominator) if denominator > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------------
# (d) APO: iterative DPO as proximal steps, with and without extrapolation
# ---------------------------------------------------------------------------------------------------------


def apo_rounds(bandit: Bandit, policy: nn.Module, loss_fn: LossFn, *, alpha: float, rounds: int,
               max_iter: int) -> dict:
    """APO as in docs/algorithms.md with exact population losses: π_0 = π̂_0 = the policy's start; round t
    minimises the loss with reference π_t on pairs drawn from π_t (starting from θ_t), giving π̂_{t+1}, then
    extrapolates. A tabular policy is extrapolated in log space (`extrapolate_logprobs`, the paper's update),
    any other in parameter space (`extrapolate_parameters`, what the LLM path does), and the log-space update
    of the same iterates is computed beside it: `extrapolation_gap` is E_x KL(log-space ‖ what was used)."""
    hat_logps = [policy().detach()]
    hat_state = {k: v.clone() for k, v in policy.state_dict().items()}
    current = hat_logps[0]
    gaps = []
    for _ in range(rounds):
        objective = preference_loss(loss_fn, current, preference_weights(bandit, current))
        if isinstance(policy, TabularPolicy):
            newton(policy, objective, max_iter=max_iter)
        else:
            minimise(policy, objective, max_iter=max_iter)
        hat_logps.append(policy().detach())
        exact = extrapolate_logprobs(hat_logps[-1], hat_logps[-2], alpha)
        new_state = {k: v.clone() for k, v in policy.state_dict().items()}
        if isinstance(policy, TabularPolicy):
            with torch.no_grad():
                policy.logits.copy_(exact)
        else:
            policy.load_state_dict(extrapolate_parameters(new_state, hat_state, alpha))
        hat_state, current = new_state, policy().detach()
        gaps.append(float(expected_kl(exact, current, bandit.prompt_weights)))
    return {"hat_logps": hat_logps, "extrapolation_gap": gaps}


def proximal_logps(bandit: Bandit, beta: float, alpha: float, rounds: int) -> list[Tensor]:
    """APO with exact proximal steps in closed form: π̂_{t+1} ∝ π_t·exp(r*/β) (the population DPO minimiser
    with reference π_t, whatever the pairs' distribution), then the log-space extrapolation."""
    hat = [bandit.reference_logps]
    current = bandit.reference_logps
    for _ in range(rounds):
        hat.append(torch.log_softmax(current + bandit.reward / beta, dim=-1))
        current = extrapolate_logprobs(hat[-1], hat[-2], alpha)
    return hat


def effective_steps(alpha: float, rounds: int) -> list[float]:
    """c_t with π̂_t ∝ π_ref·exp(c_t·r*/β) under exact proximal steps: c_{t+1} = c_t + α·(c_t − c_{t−1}) + 1,
    c_0 = c_{−1} = 0. Iterative DPO has c_t = t; APO's step c_{t+1} − c_t grows to 1/(1 − α)."""
    c = [0.0, 0.0]
    for _ in range(rounds):
        c.append(c[-1] + alpha * (c[-1] - c[-2]) + 1)
    return c[1:]


def apo(bandit: Bandit, loss_fn: LossFn, *, beta: float, alphas: list[float], rounds: int,
        target_suboptimality: float, mlp_hidden: int, max_iter: int, seed: int) -> dict:
    """Iterative DPO (α = 0) against APO for each α on three policies: tabular with the exact log-space
    extrapolation, linear-softmax and a small MLP with the parameter-space one. Per round: the sub-optimality
    of the output iterate π̂_t; rounds to reach a target; the gap between the two extrapolations; and for the
    tabular policy the distance to the closed-form proximal steps."""
    policies = {"tabular": lambda: TabularPolicy(bandit.reference_logps),
                "linear-softmax": lambda: LinearSoftmaxPolicy(bandit.reference_logps, bandit.features),
                "mlp": lambda: MLPPolicy(bandit.reference_logps, bandit.features, mlp_hidden, seed)}
    runs = []
    alphas = [float(alpha) for alpha in alphas]
    for alpha in alphas:
        closed_form = proximal_logps(bandit, beta, alpha, rounds)
        for kind, build in policies.items():
            result = apo_rounds(bandit, build(), loss_fn, alpha=alpha, rounds=rounds, max_iter=max_iter)
            gaps = [suboptimality(bandit, lp) for lp in result["hat_logps"]]
            run = {"alpha": alpha, "policy": kind, "suboptimality": gaps,
                   "rounds_to_target": next((t for t, g in enumerate(gaps) if g <= target_suboptimality), None),
                   "extrapolation_gap": result["extrapolation_gap"]}
            if kind == "tabular":
                run["closed_form_kl"] = [float(expected_kl(c, h, bandit.prompt_weights))
                                         for c, h in zip(closed_form, result["hat_logps"])]
            runs.append(run)
    best = bandit.reward.argmax(-1, keepdim=True)
    return {"beta": beta, "rounds": rounds, "target": target_suboptimality, "runs": runs,
            "effective_steps": {str(alpha): effective_steps(alpha, rounds) for alpha in alphas},
            # mirror-descent bound for exact proximal steps: gap(π̂_t) ≤ β·E_x log(1/π_ref(y*|x)) / c_t
            "bound_constant": beta * float((bandit.prompt_weights * -bandit.reference_logps.gather(1, best)[:, 0]).sum())}


# ---------------------------------------------------------------------------------------------------------
# (e) MC-PO: the normaliser estimate, and every loss form × sampler that `prefrun train` offers
# ---------------------------------------------------------------------------------------------------------


def normaliser_estimates(bandit: Bandit, *, num_negatives: list[int], repeats: int, seed: int) -> dict:
    """Bias and variance of log Z estimates against M, for Z(x) = Σ_y π_ref(y|x)·exp r*(x, y): MC-PO's
    normaliser at its optimum (there r_θ = r* up to a per-prompt constant, which shifts log Z and every
    estimate alike). Negatives y_1..y_M ~ π_ref i.i.d., the preferred y_w ~ p* ∝ π_ref·exp r*:
        plain Monte Carlo   log( (1/M)·Σ_j exp r_j )
        inside MC-PO's loss log( (exp r_w + Σ_j exp r_j) / (M + 1) ), the normaliser of −log softmax."""
    generator = torch.Generator().manual_seed(seed)
    log_z = torch.logsumexp(bandit.reference_logps + bandit.reward, dim=-1)
    preferred = torch.softmax(bandit.reference_logps + bandit.reward, dim=-1)
    num_prompts = bandit.reward.shape[0]
    rows = []
    for m in num_negatives:
        negatives = torch.multinomial(bandit.reference_logps.exp(), repeats * m, replacement=True, generator=generator)
        winners = torch.multinomial(preferred, repeats, replacement=True, generator=generator)
        negative_rewards = bandit.reward.gather(1, negatives).view(num_prompts, repeats, m)
        winner_rewards = bandit.reward.gather(1, winners)[..., None]
        estimates = {"plain": torch.logsumexp(negative_rewards, dim=-1) - math.log(m),
                     "loss": torch.logsumexp(torch.cat([winner_rewards, negative_rewards], -1), -1) - math.log(m + 1)}
        row: dict = {"M": m}
        for name, estimate in estimates.items():
            error = estimate - log_z[:, None]
            row[name] = {"bias": float((bandit.prompt_weights * error.mean(1)).sum()),
                         "variance": float((bandit.prompt_weights * error.var(1)).sum()),
                         "bias_stderr": float((bandit.prompt_weights * error.var(1) / repeats).sum().sqrt())}
        rows.append(row)
    # Before the log the plain estimate is unbiased with Var(Ẑ/Z) = Var_{π_ref}(exp r*)/(M·Z²): the 1/M law.
    relative = (bandit.reference_logps.exp() * (bandit.reward - log_z[:, None]).exp().square()).sum(-1) - 1
    return {"rows": rows, "relative_variance_of_z_times_m": float((bandit.prompt_weights * relative).sum())}


def _chosen_first(candidates: Tensor, chosen: Tensor) -> Tensor:
    """Each pool [P, K] reordered so that the chosen position comes first (the LLM path's layout: column 0 is
    y_w), the candidate it displaces taking its place."""
    order = torch.arange(candidates.shape[1]).repeat(len(candidates), 1)
    order[torch.arange(len(candidates)), chosen] = 0
    order[:, 0] = chosen
    return candidates.gather(1, order)


def make_pools(bandit: Bandit, *, pool_size: int, num_pools: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """MC-PO data as the training loop sees it: per prompt, `num_pools` pools of K candidates drawn i.i.d. from
    π_ref; the preferred one, picked by the Luce choice rule on r* (for K = 2 that is Bradley–Terry: DPO's
    data), in column 0. Returns the prompt [P] and the pools [P, K] (response indices)."""
    prompt = torch.arange(bandit.reward.shape[0]).repeat_interleave(num_pools)
    candidates = torch.multinomial(bandit.reference_logps.exp()[prompt], pool_size, replacement=True,
                                   generator=generator)
    chosen = torch.multinomial(torch.softmax(bandit.reward[prompt[:, None], candidates], -1), 1, generator=generator)
    return prompt, _chosen_first(candidates, chosen.squeeze(1))


def winner_weighted_pools(bandit: Bandit, *, pool_size: int, num_pools: int,
                          generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Fresh pools as in `make_pools`, with the Luce draw of y_w done in closed form: each pool appears K
    times, each of its candidates in turn in column 0, weighted by D(x)·Luce probability/num_pools. A
    weighted sum over these rows is the expectation over x, pools and winners with the winner's sampling
    noise removed. Returns the prompt [P·K], the pools [P·K, K] and the weights [P·K] (summing to 1)."""
    prompt = torch.arange(bandit.reward.shape[0]).repeat_interleave(num_pools)
    candidates = torch.multinomial(bandit.reference_logps.exp()[prompt], pool_size, replacement=True,
                                   generator=generator)
    luce = torch.softmax(bandit.reward[prompt[:, None], candidates], -1)
    pools = _chosen_first(candidates.repeat_interleave(pool_size, 0), torch.arange(pool_size).repeat(len(prompt)))
    weights = bandit.prompt_weights[prompt][:, None] * luce / num_pools
    return prompt.repeat_interleave(pool_size), pools, weights.flatten()


MCPO_LOSSES: dict[str, LossFn] = {"mcpo": mcpo_loss, "mcpo_cd": mcpo_cd_loss}
Sampler = PoolSampler | DatasetSampler


@dataclass(frozen=True)
class McpoVariant:
    """One pairing `prefrun train` offers: `loss=<loss>` with a sampler as conf/sampler/*.yaml builds it.
    `fixed_point` names, when the pairing is biased in a known way, the policy it does keep as a fixed point
    (a function of the bandit and β giving log-probs [X, K]), which the testbed checks too."""

    loss: str
    sampler: Sampler
    settings: str
    fixed_point: tuple[str, Callable[[Bandit, float], Tensor]] | None = None

    @property
    def name(self) -> str:
        return getattr(self.sampler, "name", "dataset")

    @property
    def label(self) -> str:
        return f"{self.loss} × {self.name}" + (f" ({self.settings})" if self.settings else "")

    @property
    def needs_scores(self) -> bool:
        """Whether the sampler ranks the pool by the policy's score (a no-grad forward over the K candidates)."""
        return isinstance(self.sampler, (CDSampler, HardestSampler))


def mcpo_variants(num_negatives: int, temperatures: list[float]) -> list[McpoVariant]:
    """Every loss form × sampler of `prefrun train` on pools: the four replacement / y_w switches of `cd`
    and `random`, `hardest`, `reward` and `dataset` (the whole pool, M = K − 1) with each loss; for `mcpo_cd`
    also the CD temperatures of `temperatures` and `sampler.score=logp`."""
    m = num_negatives

    def switches(replacement: bool, include_chosen: bool) -> str:
        return f"{'with' if replacement else 'without'} replacement, y_w {'in' if include_chosen else 'out'}"

    def cd(replacement: bool, include_chosen: bool, temperature: float = 1.0, score: str = "reward",
           fixed_point: tuple[str, Callable[[Bandit, float], Tensor]] | None = None) -> McpoVariant:
        settings = (switches(replacement, include_chosen) + (f", τ = {temperature:g}" if temperature != 1 else "")
                    + (f", score = {score}" if score != "reward" else ""))
        sampler = CDSampler(num_negatives=m, temperature=temperature, replacement=replacement,
                            include_chosen=include_chosen, score=score)
        return McpoVariant("", sampler, settings, fixed_point)

    def random(replacement: bool, include_chosen: bool) -> McpoVariant:
        return McpoVariant("", RandomSampler(num_negatives=m, replacement=replacement, include_chosen=include_chosen),
                           switches(replacement, include_chosen))

    def tempered(tau: float) -> tuple[str, Callable[[Bandit, float], Tensor]]:
        # the draws' law softmax(r_θ/τ) matches the Luce winner's softmax(r*) where r_θ = τ·r* + const
        return (f"π_ref·exp({tau:g}·r*/β)/Z",
                lambda bandit, beta: torch.log_softmax(bandit.reference_logps + tau * bandit.reward / beta, -1))

    def by_logp() -> tuple[str, Callable[[Bandit, float], Tensor]]:
        # softmax(log π_θ) matches softmax(r*) where π_θ ∝ exp r*: π_ref and β drop out
        return "exp(r*)/Z", lambda bandit, beta: torch.log_softmax(bandit.reward, -1)

    both = [McpoVariant("", HardestSampler(num_negatives=m), ""), McpoVariant("", RewardSampler(num_negatives=m), ""),
            McpoVariant("", DatasetSampler(), "whole pool, M = K − 1")]
    log_softmax = [cd(False, False), cd(True, True), cd(True, False), cd(False, True),
                   random(False, False), random(True, True), random(True, False), random(False, True), *both]
    contrastive = [cd(True, True, float(tau), fixed_point=tempered(float(tau)) if tau != 1 else None)
                   for tau in temperatures]
    contrastive += [cd(True, True, score="logp", fixed_point=by_logp()), cd(False, False), cd(True, False),
                    cd(False, True), random(True, True), random(False, False), *both]
    return ([dataclasses.replace(v, loss="mcpo") for v in log_softmax]
            + [dataclasses.replace(v, loss="mcpo_cd") for v in contrastive])


def mcpo_batch_loss(policy_table: Tensor, reference_table: Tensor, judge_table: Tensor, prompt: Tensor, pool: Tensor,
                    variant: McpoVariant, *, beta: float, generator: torch.Generator,
                    weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One MC-PO step's loss as the training loop computes it. The pool's log-probs [B, K] (column 0: y_w) are
    scored without gradient by the sampler (`kernel_scores`: r_θ = β·(log π_θ − log π_ref) by default), the
    sampler draws M columns (they may repeat and, if it includes y_w, be column 0), and the loss of
    prefrun.losses gets the columns [y_w, draws...] gathered from the pool: `mcpo` their log-softmax, `mcpo_cd`
    −r_w + the mean of the draws' r_θ. `dataset` takes the whole pool, unscored. The tables are [rows, K]
    (`prompt` indexes their rows); `judge_table` holds the judge's scores, here r*. Returns the mean loss (the
    `weights`-weighted sum if given) and the columns [B, 1 + M]."""
    index = (prompt[:, None], pool)
    policy_logps, reference_logps = policy_table[index], reference_table[index]
    lengths = torch.ones_like(policy_logps)  # a tabular "sequence" is one table entry
    if variant.sampler.uses_pools:
        scores = variant.sampler.kernel_scores(policy_logps.detach(), reference_logps, lengths, beta)
        drawn = variant.sampler.draw(scores, judge_table[index], generator)
        columns = torch.cat([torch.zeros_like(drawn[:, :1]), drawn], dim=1)
    else:
        columns = torch.tensor(variant.sampler.columns(pool.shape[1])).expand(len(pool), -1)
    losses, _ = MCPO_LOSSES[variant.loss](policy_logps.gather(1, columns), reference_logps.gather(1, columns),
                                          lengths.gather(1, columns), beta=beta)
    return (losses.mean() if weights is None else (weights * losses).sum()), columns


def distinct_columns(columns: Tensor) -> Tensor:
    """How many different pool candidates each row's columns [y_w, draws...] name: the sequences a step has to
    run forward and backward (a draw that repeats, or that is y_w itself, costs nothing more). [B]"""
    ordered = columns.sort(dim=1).values
    return 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(1)


def mcpo_train(bandit: Bandit, variant: McpoVariant, prompt: Tensor, pools: Tensor, *, beta: float, steps: int,
               batch_size: int, lr: float, eval_every: int, seed: int) -> dict:
    """Train tabular policies (start: π_ref, Adam) on fixed pools with one variant, one policy per pool set:
    `prompt` [S, P] and `pools` [S, P, K] hold S independent sets. The S policies are trained side by side as
    one [S, X, K] table with the sum of their losses, which for Adam (element-wise) is S separate runs. Every
    `eval_every` steps: E_x KL(π** ‖ π_θ) per set. Also the mean number of sequences per row and step."""
    num_sets, num_pools = prompt.shape
    num_prompts = bandit.reward.shape[0]
    target = bandit.optimal_logps(beta)
    rows = prompt + num_prompts * torch.arange(num_sets)[:, None]  # set s uses rows s·X + x of the stacked tables
    reference, judge = bandit.reference_logps.repeat(num_sets, 1), bandit.reward.repeat(num_sets, 1)
    policy = TabularPolicy(bandit.reference_logps.expand(num_sets, -1, -1))
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    batches, negatives = torch.Generator().manual_seed(10_000 + seed), torch.Generator().manual_seed(20_000 + seed)

    def kls() -> list[float]:
        logps = policy().detach()
        return [float(expected_kl(target, logps[s], bandit.prompt_weights)) for s in range(num_sets)]

    curves, sequences = [kls()], 0.0
    for step in range(1, steps + 1):
        batch = torch.randint(num_pools, (num_sets, batch_size), generator=batches)
        loss, columns = mcpo_batch_loss(policy().flatten(0, 1), reference, judge, rows.gather(1, batch).flatten(),
                                        pools[torch.arange(num_sets)[:, None], batch].flatten(0, 1), variant,
                                        beta=beta, generator=negatives)
        optimizer.zero_grad()
        (num_sets * loss).backward()  # the sum over sets of each set's mean loss
        optimizer.step()
        sequences += float(distinct_columns(columns).to(DTYPE).mean())
        if step % eval_every == 0:
            curves.append(kls())
    return {"curves": [list(c) for c in zip(*curves)], "grad_sequences": sequences / steps}


def gradient_at(bandit: Bandit, logps: Tensor, variant: McpoVariant, *, beta: float, pool_size: int,
                num_pools: int, seed: int, chunks: int = 32) -> dict:
    """‖E ∇ loss‖ at the tabular policy `logps` over fresh pools (`num_pools` per prompt, winners in closed
    form), in `chunks` independent batches: `norm` of the mean gradient, and `noise`, the norm that the mean of
    the chunks would have from sampling noise alone (the draws, the pools). A fixed point has norm ≈ noise."""
    policy = TabularPolicy(logps)
    pools, negatives = torch.Generator().manual_seed(30_000 + seed), torch.Generator().manual_seed(40_000 + seed)
    gradients = []
    for _ in range(chunks):
        prompt, pool, weights = winner_weighted_pools(bandit, pool_size=pool_size,
                                                      num_pools=max(1, num_pools // chunks), generator=pools)
        policy.zero_grad()
        loss, _ = mcpo_batch_loss(policy(), bandit.reference_logps, bandit.reward, prompt, pool, variant, beta=beta,
                                  generator=negatives, weights=weights)
        loss.backward()
        gradients.append(policy.logits.grad.flatten().clone())
    stacked = torch.stack(gradients)
    return {"norm": float(stacked.mean(0).norm()), "noise": float((stacked.var(0).sum() / chunks).sqrt())}


def mcpo_training(bandit: Bandit, *, beta: float, pool_size: int, pools_per_prompt: int, num_negatives: int,
                  temperatures: list[float], steps: int, batch_size: int, lr: float, seeds: int, eval_every: int,
                  stationarity_pools: int, seed: int) -> dict:
    """Every variant of `mcpo_variants`: trained on the same `seeds` sets of fixed pools (and the same batch
    order), E_x KL(π** ‖ π_θ) every `eval_every` steps; then the mean gradient of its loss at π** over fresh
    pools (zero up to noise iff π** is a fixed point), and at the policy it is predicted to keep instead; and
    the cost per step, in sequences with gradient (distinct columns) and without (the scoring pass)."""
    generated = [make_pools(bandit, pool_size=pool_size, num_pools=pools_per_prompt,
                            generator=torch.Generator().manual_seed(1_000 * seed + s)) for s in range(seeds)]
    prompt, pools = torch.stack([p for p, _ in generated]), torch.stack([c for _, c in generated])
    target = bandit.optimal_logps(beta)
    results = []
    for variant in mcpo_variants(num_negatives, temperatures):
        trained = mcpo_train(bandit, variant, prompt, pools, beta=beta, steps=steps, batch_size=batch_size, lr=lr,
                             eval_every=eval_every, seed=1_000 * seed)
        check = functools.partial(gradient_at, bandit, variant=variant, beta=beta, pool_size=pool_size,
                                  num_pools=stationarity_pools, seed=1_000 * seed)
        result = {"loss": variant.loss, "sampler": variant.name, "settings": variant.settings,
                  "label": variant.label, **trained, "at_optimum": check(target),
                  "scored_sequences": pool_size if variant.needs_scores else 0}
        if variant.fixed_point is not None:
            name, logps = variant.fixed_point
            result["predicted"] = {"policy": name, **check(logps(bandit, beta))}
        results.append(result)
    # what the CD weights look like at π**, where r_θ = r* + const: softmax(r*) over each pool
    prompt, fresh = make_pools(bandit, pool_size=pool_size, num_pools=1024,
                               generator=torch.Generator().manual_seed(50_000 + seed))
    ess = effective_sample_size(bandit.reward[prompt[:, None], fresh])
    return {"steps": list(range(0, steps + 1, eval_every)), "variants": results, "num_negatives": num_negatives,
            "pool_size": pool_size, "effective_sample_size": float(ess.mean())}


def mcpo(bandit: Bandit, *, beta: float, normaliser: dict, training: dict, seed: int) -> dict:
    """(e): the normaliser estimate against M, and MC-PO training with every loss × sampler pairing."""
    return {"beta": beta, "normaliser": normaliser_estimates(bandit, seed=seed, **normaliser),
            "training": mcpo_training(bandit, beta=beta, seed=seed, **training)}


# ---------------------------------------------------------------------------------------------------------
# `prefrun testbed`
# ---------------------------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict:
    """Run (a)–(e) on the configured bandits and write the markdown report and its plots."""
    from hydra.utils import instantiate, to_absolute_path

    loss_fn = instantiate(cfg.loss)
    beta = float(cfg.loss.beta)  # the loss's β is the bandit's β: π** = π_ref·exp(r*/β)/Z
    c = OmegaConf.to_container(cfg, resolve=True)  # plain dicts and lists from here on
    seed = c["seed"]
    training = c["mcpo"]["training"]
    if not 1 <= training["num_negatives"] < training["pool_size"]:  # fail before minutes of (a)–(d), not after
        raise InputError(f"mcpo.training.num_negatives={training['num_negatives']} must be between 1 and "
                         f"mcpo.training.pool_size − 1 = {training['pool_size'] - 1}")
    if not training["temperatures"] or min(training["temperatures"]) <= 0:
        raise InputError(f"mcpo.training.temperatures={training['temperatures']}: give CD temperatures τ > 0, e.g. [1.0]")
    bandit = make_bandit(**c["bandit"], seed=seed)
    proposition = proposition_bandit(**c["constrained"].pop("bandit"), seed=seed)
    experiments = {
        "a": lambda: dpo_optimum(bandit, loss_fn, beta=beta, seed=seed, **c["dpo_optimum"]),
        "b": lambda: constrained_dpo(proposition, **c["constrained"]),
        "c": lambda: reference_noise(bandit, beta=beta, seed=seed, **c["reference_noise"]),
        "d": lambda: apo(bandit, loss_fn, beta=beta, seed=seed, **c["apo"]),
        "e": lambda: mcpo(bandit, beta=beta, seed=seed, **c["mcpo"]),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tensors are tiny: thread start-up would dominate, even more on a busy machine
    results: dict = {}
    try:
        for name, experiment in experiments.items():
            started = time.perf_counter()
            results[name] = experiment()
            log.info("testbed (%s) done in %.1f s", name, time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    markdown, plots = Path(to_absolute_path(cfg.output.markdown)), Path(to_absolute_path(cfg.output.plots_dir))
    write_report(results, cfg, markdown, plots)
    log.info("testbed report written: %s (plots in %s)", markdown, plots)
    _save_json(results)
    return results


def _save_json(results: dict) -> None:
    """All numbers, as testbed.json beside Hydra's log in the run directory (when run through the CLI)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        path = Path(HydraConfig.get().runtime.output_dir) / "testbed.json"
        path.write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------------------------
# The report: docs/testbed.md and its plots
# ---------------------------------------------------------------------------------------------------------

PALETTE = {"DPO": "tab:blue", "forward KL": "tab:cyan", "RLHF": "tab:red", "reverse KL": "tab:orange"}
KL_LIMIT = 1e-4  # claim (a)
AGREEMENT = 1e-6  # what 'the same minimiser' means in (b): largest total variation over prompts


def _num(value: float | None) -> str:
    if value is None:
        return "—"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.2e}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_report(results: dict, cfg: DictConfig, markdown: Path, plots: Path) -> None:
    """docs/testbed.md (numbers, what was computed, verdicts) and one PNG per experiment under `plots`."""
    import matplotlib

    matplotlib.use("Agg")
    plots.mkdir(parents=True, exist_ok=True)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    link = Path(_relative(plots, markdown.parent))
    figures = {"a": plot_dpo_optimum, "b": plot_constrained, "c": plot_reference_noise, "d": plot_apo, "e": plot_mcpo}
    sections = {"a": report_dpo_optimum, "b": report_constrained, "c": report_reference_noise, "d": report_apo,
                "e": report_mcpo}
    parts = [report_header(cfg)]
    for key, section in sections.items():
        name = f"{key}_{section.__name__.removeprefix('report_')}.png"
        figures[key](results[key], plots / name)
        parts.append(section(results[key], cfg) + f"\n\n![({key})]({(link / name).as_posix()})\n")
    parts.append(report_footer(cfg))
    markdown.write_text("\n\n".join(parts).rstrip() + "\n")


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


def report_header(cfg: DictConfig) -> str:
    b = cfg.bandit
    return f"""# The exact testbed

Generated by `prefrun testbed` (config `conf/testbed.yaml`, code `prefrun/testbed.py`); do not edit by hand.
On a finite contextual bandit every optimum is computable, so each claim of the papers behind prefrun is
checked exactly, with the loss, sampler and extrapolation functions of the LLM path (`prefrun.losses`,
`prefrun.samplers`, `prefrun.extrapolate`) — one implementation, not copies. Everything runs in float64.

**The bandit** (used by (a), (c), (d), (e); (b) builds the setting of its proposition). {b.num_prompts}
prompts x with D(x) uniform, {b.num_responses} responses y each; the true reward is
r*(x, y) = {b.reward_scale}·(√{b.feature_share}·φ(x, y)·w + √(1 − {b.feature_share})·ε), with features φ(x, y) ∈ ℝ^{b.num_features}
and ε i.i.d. N(0, 1) (so a fraction {b.feature_share} of r*'s variance is linear in the features that the constrained
policies see); π_ref(·|x) = softmax of N(0, {b.reference_scale}²) logits. Seed {cfg.seed}. Preference data: two
responses drawn from the sampling policy (ties dropped, as prefrun's data pipeline does), the winner by
Bradley–Terry, p*(y₁ ≻ y₂|x) = σ(r*(x, y₁) − r*(x, y₂)). β = {_num(float(cfg.loss.beta))}, the β of the loss under test
(`{cfg.loss._target_}`), so the target is π** = π_ref·exp(r*/β)/Z.

**Population losses.** The infinite-data loss is the exact expectation Σ P(x, y_w, y_l)·ℓ(x, y_w, y_l) over
every (prompt, winner, loser), with ℓ the per-pair loss from `prefrun.losses` called on [B, 2] "sequence
log-probs" gathered from the policy's log-prob table (completion lengths 1). A finite-data loss is the same sum
under the empirical distribution of sampled records. "Minimiser" means minimised to numerical convergence
(L-BFGS, or Newton's method for the tabular proximal steps of (d)), not wherever an optimiser stopped.

**Policies.** *Tabular*: one free logit per (x, y), unconstrained. *Linear-softmax*: π_θ(y|x) ∝ π_ref(y|x)·exp(θ·φ(x, y)),
θ ∈ ℝ^d. *MLP* (in (d)): π_θ(y|x) ∝ π_ref(y|x)·exp(f_θ(φ(x, y))), f a tanh network with
{cfg.apo.mlp_hidden} hidden units. Constraints are also imposed as a fixed number of full-batch gradient steps
(early stopping) and as weight decay."""


def report_footer(cfg: DictConfig) -> str:
    config = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "output"]))
    return f"""## Reproduce

`prefrun testbed` with the defaults rewrites this page and its plots; any key below can be overridden on the
command line (`prefrun testbed seed=3 bandit.num_responses=12`), and `prefrun testbed loss=<name>` runs (a) and
(d) on another loss (see the README, "Checking a loss on the exact testbed"). The run directory
(`outputs/testbed/<date>/<time>/`) keeps every number in `testbed.json`. The composed config:

```yaml
{config.rstrip()}
```"""


# (a) -----------------------------------------------------------------------------------------------------


def report_dpo_optimum(r: dict, cfg: DictConfig) -> str:
    holds = r["kl_population"] < KL_LIMIT
    rows = [["population (∞)", _num(r["kl_population"]), "0"]]
    rows += [[f"{s['num_pairs']:,}", _num(s["kl"]), str(s["degenerate_prompts"])] for s in r["sampled"]]
    return f"""## (a) Unconstrained DPO converges to π**

A tabular policy, started at π_ref, minimises the loss with reference π_ref on pairs drawn from π_ref, and
we measure E_x KL(π** ‖ π_θ), π** = π_ref·exp(r*/β)/Z. At the start (π_θ = π_ref) it is {_num(r['kl_reference'])}.

**Population loss: KL = {_num(r['kl_population'])}** (largest total variation over prompts
{_num(r['max_tv_population'])}) after {len(r['population_trace'])} L-BFGS function evaluations:
the claim KL < {KL_LIMIT:g} **{'holds' if holds else 'does not hold'}** for `{cfg.loss._target_}`.
With N sampled pairs the finite-data minimiser approaches π** at the rate ~1/N once every prompt's comparison
graph is strongly connected; where it is not (a response that never lost), the unconstrained minimiser does not
exist and the logits run off (Azar et al.'s degenerate case, which early stopping or a constraint hides).

{_table(["pairs N", "E_x KL(π** ‖ π_θ)", "prompts without a minimiser"], rows)}"""


def plot_dpo_optimum(r: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.semilogy(r["population_trace"], color="black", lw=2, label="population loss")
    for s, color in zip(r["sampled"], plt.cm.viridis(torch.linspace(0.15, 0.85, len(r["sampled"])).tolist())):
        left.semilogy(s["trace"], color=color, label=f"N = {s['num_pairs']:,} pairs")
    left.axhline(KL_LIMIT, color="grey", ls="--", label=f"claim: KL < {KL_LIMIT:g}")
    left.set(xlabel="L-BFGS function evaluation", ylabel="E_x KL(π** ‖ π_θ)", title="(a) DPO on a tabular policy → π**")
    left.legend(fontsize=8)
    sizes = [s["num_pairs"] for s in r["sampled"]]
    kls = [s["kl"] for s in r["sampled"]]
    right.loglog(sizes, kls, "o-", color="tab:blue", label="finite-data minimiser")
    anchor = sizes[-1], kls[-1]
    right.loglog(sizes, [anchor[1] * anchor[0] / n for n in sizes], ":", color="grey", label="∝ 1/N")
    right.axhline(max(r["kl_population"], 1e-16), color="black", lw=2, label=f"population loss ({_num(r['kl_population'])})")
    right.axhline(KL_LIMIT, color="grey", ls="--", label=f"{KL_LIMIT:g}")
    for n, kl, s in zip(sizes, kls, r["sampled"]):
        if s["degenerate_prompts"]:
            right.annotate(f"{s['degenerate_prompts']} prompt(s)\nwithout a minimiser", (n, kl), fontsize=8,
                           textcoords="offset points", xytext=(8, -4))
    right.set(xlabel="sampled preference pairs N", ylabel="E_x KL(π** ‖ π̂_N)", title="distance to π** against data size")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# (b) -----------------------------------------------------------------------------------------------------


def report_constrained(r: dict, cfg: DictConfig) -> str:
    c = cfg.constrained
    rows, verdicts = [], []
    for row in r["rows"]:
        rows.append([row["constraint"], _num(row["tv_dpo_forward"]), _num(row["tv_rlhf_reverse"]),
                     _num(row["tv_dpo_rlhf"]), _num(row["param_dpo_rlhf"]),
                     f"{_num(row['forward_kl']['DPO'])} / {_num(row['forward_kl']['RLHF'])}",
                     f"{_num(row['reverse_kl']['DPO'])} / {_num(row['reverse_kl']['RLHF'])}",
                     f"{_num(row['entropy']['DPO'])} / {_num(row['entropy']['RLHF'])}",
                     f"{_num(row['under_coverage']['DPO'])} / {_num(row['under_coverage']['RLHF'])}"])
        matches = row["tv_dpo_forward"] < AGREEMENT and row["tv_rlhf_reverse"] < AGREEMENT
        differ = row["tv_dpo_rlhf"] > 1e3 * AGREEMENT
        verdicts.append(f"*{row['constraint']}*: DPO ≡ forward KL and RLHF ≡ reverse KL "
                        f"**{'hold' if matches else 'do not hold'}**; DPO and RLHF minimisers "
                        f"**{'differ' if differ else 'coincide'}**.")
    constrained = [row for row in r["rows"] if not row["constraint"].startswith("none")]
    covering = sum(row["entropy"]["DPO"] > row["entropy"]["RLHF"] for row in constrained)
    linear, early = r["rows"][0], r["rows"][1]
    early = ("has the smaller forward KL here" if early["forward_kl"]["RLHF"] < early["forward_kl"]["DPO"]
             else "need not have the larger forward KL (here it does)")
    covering, constrained = str(covering), str(len(constrained))
    header = ["constraint", "TV(DPO, fwd KL)", "TV(RLHF, rev KL)", "TV(DPO, RLHF)", "‖θ_DPO − θ_RLHF‖∞",
              "E KL(π*‖π_θ) DPO / RLHF", "E KL(π_θ‖π*) DPO / RLHF", "entropy DPO / RLHF",
              "min log(π_θ/π*) DPO / RLHF"]
    return f"""## (b) Proposition 3.1 (Wipf et al.): constrained DPO minimises the forward KL, RLHF the reverse KL

**Setting, as in the proof (paper 001, appendix C).** {c.bandit.num_prompts} prompts, exactly two responses y₁, y₂
per prompt with π_ref(y₁|x) = π_ref(y₂|x) = ½, β = λ = 1, pairs drawn from π_ref and labelled by Bradley–Terry on r*
(r* built as above with scale {c.bandit.reward_scale}, feature share {c.bandit.feature_share}, d = {c.bandit.num_features}). Then π** = π*, the
BT-optimal policy π*(y|x) ∝ exp r*(x, y), and since π_θ(y_w) + π_θ(y_l) = 1 the population DPO loss equals
E_x[−Σ_y π*(y|x)·log π_θ(y|x)] = E_x KL(π* ‖ π_θ) + const (eq. 22), while the RLHF loss with r* equals
E_x KL(π_θ ‖ π*) + const (eq. 20). Pairs with y₁ = y₂ (probability ½) carry the constant log 2 and are dropped.

**What was computed.** Four objectives, each minimised on its own under each constraint, starting from π_ref:
(1) the population DPO loss through `prefrun.losses.dpo_loss` (β = 1); (2) the forward KL E_x KL(π* ‖ π_θ),
directly; (3) the RLHF loss E_x[E_{{y~π_θ}}(−r*) + KL(π_θ ‖ π_ref)] in closed form (an exact policy gradient, no
sampling); (4) the reverse KL E_x KL(π_θ ‖ π*), directly. Constraints: a linear-softmax family
(d = {c.bandit.num_features} < the {c.bandit.num_prompts} free log-odds π* needs; exact minimiser by L-BFGS); a tabular policy after
{c.gradient_steps} full-batch gradient steps at learning rate {c.lr} (early stopping: "the minimiser" is where the
steps end); a tabular policy with weight decay {c.weight_decay}·‖logits‖²/2 (exact minimiser); and no constraint.
Distances between policies are the largest total variation over prompts (TV); "min log(π_θ/π*)" is how far below
π* a policy goes anywhere (very negative: it drops a response π* supports).

{_table(header, rows)}

{chr(10).join('- ' + v for v in verdicts)}

**Mode covering vs mode seeking.** The forward KL (DPO) punishes π_θ ≪ π* wherever π* has mass, so DPO's
solution hedges and keeps every response π* supports; the reverse KL (RLHF) punishes π_θ ≫ π* where π* is small
and tolerates dropping responses π* supports, so RLHF's solution commits. Here DPO's solution has the higher
entropy under {covering} of the {constrained} constraints (π* itself: {_num(r['entropy_target'])}). In the linear
family RLHF's solution gives some response exp({_num(linear['under_coverage']['RLHF'])}) times its probability under π*,
while DPO's never goes below exp({_num(linear['under_coverage']['DPO'])}) times: RLHF drops a mode, DPO covers it. Under early stopping both objectives of a
pair take the same {c.gradient_steps} steps (the DPO gradient *is* the forward-KL gradient), so their end points
coincide exactly; but an end point is not a minimiser over a set, so RLHF's end point {early}."""


def plot_constrained(r: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    segment = r["segment"]
    styles = {"DPO": "-", "forward KL": "--", "RLHF": "-", "reverse KL": "--"}
    for name, style in styles.items():
        axes[0].plot(segment["s"], segment[name], style, color=PALETTE[name], lw=2.5 if style == "-" else 1.5,
                     label=name)
    axes[0].axvline(0, color="tab:blue", lw=0.8, ls=":")
    axes[0].axvline(1, color="tab:red", lw=0.8, ls=":")
    axes[0].set_yscale("symlog", linthresh=1e-2)
    axes[0].set_ylim(bottom=0)
    axes[0].set(xlabel="s  (θ = θ_DPO + s·(θ_RLHF − θ_DPO))", ylabel="objective − its minimum over the family",
                title=f"(b) {r['rows'][0]['constraint']}: objectives along θ(s)")
    axes[0].legend(fontsize=8)
    target = torch.tensor(r["target_logps"]).exp()[:, 0]  # π(y₂|x) = 1 − π(y₁|x): y₁ says it all
    for ax, row in zip(axes[1:], r["rows"][:2]):
        for name, marker in (("DPO", "o"), ("RLHF", "s")):
            ax.scatter(target, torch.tensor(row["logps"][name]).exp()[:, 0], marker=marker, s=26, alpha=0.75,
                       color=PALETTE[name], label=f"{name} minimiser (≡ {'forward' if name == 'DPO' else 'reverse'} KL)")
        ax.plot([0, 1], [0, 1], color="black", lw=0.8, label="π_θ = π*")
        ax.set(xlabel="π*(y₁|x), one point per prompt", ylabel="π_θ(y₁|x)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
               title=f"{row['constraint']}\nentropy DPO {row['entropy']['DPO']:.3f}, RLHF {row['entropy']['RLHF']:.3f}")
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# (c) -----------------------------------------------------------------------------------------------------


def report_reference_noise(r: dict, cfg: DictConfig) -> str:
    start, end = r["start"], r["end"]
    rows = [[stage, _num(s["max_formula_error"]), _num(s["mean_scale_clean"]), _num(s["mean_scale_noisy"]),
             _num(s["spearman_gamma"]), _num(s["spearman_margin"])] for stage, s in
            (("start (π_θ = π_ref)", start), (f"after {r['gradient_steps']} steps", end))]
    table = _table(["snapshot", "max \\|autograd − u/(γ+u)\\|", "mean scale, log γ ≤ 0", "mean scale, log γ > 0",
                    "Spearman(log γ, scale)", "Spearman(r*_w − r*_l, scale)"], rows)  # \\| : a pipe inside a table
    return f"""## (c) Reference noise γ against the per-pair gradient scale (paper 001, §5)

Paper 001 rewrites the DPO loss of a pair as ℓ = log(γ + u) − log γ with the *reference noise*
γ = [π_ref(y_l)/π_ref(y_w)]^β (large when the reference prefers the loser) and u = [π_θ(y_l)/π_θ(y_w)]^β: a concave
penalty of u whose curvature γ sets — ℓ0-like for small γ, ℓ1-like for large γ (left plot, the paper's Figure 2).
We drew {r['num_pairs']:,} pairs from π_ref (β = {_num(r['beta'])}; a fraction {_num(r['fraction_noisy'])} of them have
log γ > 0), trained a linear-softmax policy on them with `dpo_loss` ({r['gradient_steps']} full-batch gradient steps), and
recorded per pair log γ (`prefrun.losses.log_reference_noise`) and the gradient scale |∂ℓ/∂Δ| that autograd
finds through `dpo_loss` (Δ the implicit-reward margin; ∂ℓ/∂θ = −β·|∂ℓ/∂Δ|·∇(log π_θ(y_w) − log π_θ(y_l))).

{table}

What comes out: the scale is exactly u/(γ + u) = σ(−Δ) (max deviation {_num(max(start['max_formula_error'],
end['max_formula_error']))}). At the reference u = γ, so every pair starts with scale ½ whatever its γ: the reference
noise does not reweight the first gradient steps. After {r['gradient_steps']} steps the rank correlation of the scale
with log γ is {_num(end['spearman_gamma'])}, with the true margin r*_w − r*_l {_num(end['spearman_margin'])}: the scale
follows the margin the policy has learned (Δ moves with θ, and γ does not enter ∂Δ/∂θ), not the reference noise.
γ's role is where the curvature of log(γ + u) sits in u (∂ℓ/∂u = 1/(γ + u), steep near u = 0 when the reference is
clean, left plot): how hard DPO keeps pushing a pair far past the reference — which, under a constraint, the
constraint then trades against the other pairs."""


def plot_reference_noise(r: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    u = torch.linspace(0, 3, 301, dtype=DTYPE)
    for gamma, color in zip((0.01, 0.1, 1.0, 10.0), ("tab:red", "tab:orange", "tab:green", "tab:blue")):
        penalty = torch.log(gamma + u) - math.log(gamma)
        left.plot(u, penalty / penalty[-1], color=color, label=f"γ = {gamma:g}")
    left.plot(u, u / u[-1], ":", color="black", label="ℓ1 (|u|)")
    left.set(xlabel="u = [π_θ(y_l)/π_θ(y_w)]^β", ylabel="(log(γ+u) − log γ), scaled to 1 at u = 3",
             title="(c) the DPO penalty log(γ + u): γ sets its concavity")
    left.legend(fontsize=8)
    log_gamma = r["log_gamma"]
    right.scatter(log_gamma, r["start"]["scale"], s=8, color="grey", alpha=0.6, label="start (π_θ = π_ref)")
    points = right.scatter(log_gamma, r["end"]["scale"], s=8, c=r["margin"], cmap="coolwarm", alpha=0.8,
                           label=f"after {r['gradient_steps']} DPO steps")
    fig.colorbar(points, ax=right, label="true margin r*(y_w) − r*(y_l)")
    right.axvline(0, color="black", lw=0.6, ls=":")
    right.set(xlabel="log γ = β·(log π_ref(y_l) − log π_ref(y_w))", ylabel="|∂ℓ/∂Δ| = u/(γ + u)",
              title="per-pair gradient scale against reference noise", ylim=(0, 1))
    right.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# (d) -----------------------------------------------------------------------------------------------------


def report_apo(r: dict, cfg: DictConfig) -> str:
    runs = {(run["policy"], run["alpha"]): run for run in r["runs"]}
    alphas = sorted({run["alpha"] for run in r["runs"]})
    base = runs[("tabular", 0.0)] if ("tabular", 0.0) in runs else None
    rows = []
    for (kind, alpha), run in runs.items():
        gaps = run["suboptimality"]
        rows.append([kind, f"{alpha:g}", _num(gaps[1]), _num(gaps[min(3, len(gaps) - 1)]), _num(gaps[-1]),
                     str(run["rounds_to_target"] if run["rounds_to_target"] is not None else f"> {r['rounds']}"),
                     _num(max(run["extrapolation_gap"])),
                     _num(max(run["closed_form_kl"])) if "closed_form_kl" in run else "—"])
    table = _table(["policy", "α", "gap(π̂_1)", f"gap(π̂_{min(3, r['rounds'])})", f"gap(π̂_{r['rounds']})",
                    f"rounds to gap ≤ {r['target']:g}", "max KL(log-space ‖ used)", "max KL(closed form ‖ fitted)"],
                   rows)
    tabular = [runs[("tabular", a)] for a in alphas if ("tabular", a) in runs]
    faster = all(
        all(g <= g0 + 1e-12 for g, g0 in zip(run["suboptimality"], base["suboptimality"]))
        for run in tabular) if base else False
    predicted = {run["alpha"]: base["rounds_to_target"] * (1 - run["alpha"])
                 for run in tabular if base and base["rounds_to_target"] is not None}
    speedups = "; ".join(
        f"α = {run['alpha']:g}: {run['rounds_to_target'] if run['rounds_to_target'] is not None else '> ' + str(r['rounds'])}"
        f" (the (1 − α) scaling predicts {predicted[run['alpha']]:.1f})" for run in tabular if run["alpha"] in predicted)
    as_claimed = all(run["rounds_to_target"] is not None and run["rounds_to_target"] <= math.ceil(predicted[run["alpha"]])
                     for run in tabular if run["alpha"] in predicted)
    mlp_gaps = ", ".join(f"α = {run['alpha']:g}: {_num(max(run['extrapolation_gap']))}"
                         for run in r["runs"] if run["policy"] == "mlp" and run["alpha"] > 0)
    steps = ", ".join(f"α = {a}: c_{r['rounds']} = {c[-1]:.2f}" for a, c in r["effective_steps"].items())
    linear_gap = max((max(run["extrapolation_gap"]) for run in r["runs"] if run["policy"] == "linear-softmax"), default=0)
    overshoot = [f"{run['alpha']:g}" for run in r["runs"]
                 if run["policy"] == "linear-softmax" and run["suboptimality"][-1] > min(run["suboptimality"]) + 1e-9]
    erratic = [f"{run['alpha']:g}" for run in r["runs"] if run["policy"] == "mlp"
               and any(b > a + 1e-9 for a, b in zip(run["suboptimality"], run["suboptimality"][1:]))]
    linear_floor = min((min(run["suboptimality"]) for run in r["runs"] if run["policy"] == "linear-softmax"), default=0)
    closed = max((max(run["closed_form_kl"]) for run in tabular), default=0)
    return f"""## (d) APO: iterative DPO as exact proximal steps, with Nesterov extrapolation

**What was computed.** π_0 = π̂_0 = π_ref. Round t: pairs drawn from π_t, labelled by Bradley–Terry on r*; π̂_{{t+1}}
minimises the population loss (`{cfg.loss._target_}`, β = {_num(r['beta'])}) with reference π_t, starting from θ_t;
then π_{{t+1}} = extrapolation of (π̂_{{t+1}}, π̂_t) with momentum α. Tabular policy: the paper's exact update
`prefrun.extrapolate.extrapolate_logprobs`, log π_{{t+1}} = log π̂_{{t+1}} + α·(log π̂_{{t+1}} − log π̂_t) − log Z. Linear-softmax
and MLP: the parameter-space update `prefrun.extrapolate.extrapolate_parameters`, θ_{{t+1}} = θ̂_{{t+1}} + α·(θ̂_{{t+1}} − θ̂_t),
with the log-space update of the same iterates computed beside it ("max KL(log-space ‖ used)"). α = 0 is iterative DPO.
**Sub-optimality** of the output iterate: gap(π̂_t) = E_x[max_y r*(x, y) − E_{{y~π̂_t}} r*(x, y)], the expected reward
left on the table relative to the optimal (greedy) policy that the rounds converge to (the KL to the previous
iterate vanishes over rounds, so the target is argmax r*, not π**). At π_ref it is {_num(base['suboptimality'][0]) if base else '—'}.

**Exact proximal steps.** Unconstrained, the population DPO minimiser with reference π_t is π_t·exp(r*/β)/Z, so
log π̂_t = log π_ref + c_t·r*/β + const with c_{{t+1}} = c_t + α·(c_t − c_{{t−1}}) + 1 (c_0 = c_{{−1}} = 0): iterative
DPO has c_t = t, and APO's step grows to 1/(1 − α) ({steps}). The fitted tabular rounds follow this closed form
to KL ≤ {_num(closed)}. The mirror-descent bound gap ≤ β·E_x log(1/π_ref(y*|x))/c_t = {_num(r['bound_constant'])}/c_t
is the O((1 − α)/t) of the paper, since c_t ≈ t/(1 − α).

{table}

**What comes out.** *Tabular, exact:* does every α > 0 have a sub-optimality no larger than iterative DPO's at every
round? **{'Yes' if faster else 'No'}** (round 1 is shared). Rounds to reach gap ≤ {r['target']:g}: {speedups or '—'}.
α > 0 does reach the target in fewer rounds, but {'as fast as' if as_claimed else 'not as fast as'} the (1 − α) scaling
of the O((1 − α)/t) bound predicts: with exact proximal steps the gap is a function of c_t alone (top right: all α on
one curve), and that curve is not ~1/c — it falls like exp(−c·Δr/β), fast at first and then limited by the prompts
whose two best responses are close in reward, while the bound only caps it. *Parameter space:* for linear-softmax the
update equals the log-space one (max KL {_num(linear_gap)}: rounding), as the paper says; its sub-optimality stalls
at the family's floor ({_num(linear_floor)}: r* is only partly linear in φ), so the tabular and linear runs are far
apart because of the constraint, not the extrapolation, and α changes little there (it ends above its own best
round, an overshoot, for α ∈ {{{', '.join(overshoot)}}}).
For the MLP, which is not log-linear, the parameter-space update is not the paper's: max KL from the log-space update
of the same iterates {mlp_gaps}. Its fits are non-convex (L-BFGS, at most {cfg.apo.max_iter} iterations per round
from θ_t), and its sub-optimality rises in some round for α ∈ {{{', '.join(erratic)}}}. On the LLM path the approximation is as good as the model
is log-linear in its parameters along the step."""


def plot_apo(r: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    alphas = sorted({run["alpha"] for run in r["runs"]})
    colors = dict(zip(alphas, plt.cm.plasma(torch.linspace(0, 0.85, len(alphas)).tolist())))
    rounds = list(range(r["rounds"] + 1))
    for run in r["runs"]:
        color, label = colors[run["alpha"]], f"α = {run['alpha']:g}"
        if run["policy"] == "tabular":
            axes[0, 0].semilogy(rounds, run["suboptimality"], "o-", color=color, label=label)
            axes[0, 1].semilogy(r["effective_steps"][str(run["alpha"])], run["suboptimality"], "o",
                                color=color, label=label)
        else:
            style = "o-" if run["policy"] == "linear-softmax" else "^:"
            axes[1, 0].semilogy(rounds, run["suboptimality"], style, color=color)
            if run["alpha"] > 0:
                axes[1, 1].semilogy(rounds[1:], [max(g, 1e-18) for g in run["extrapolation_gap"]], style, color=color)
    if "0.0" in r["effective_steps"]:
        c = r["effective_steps"]["0.0"][1:]
        axes[0, 0].semilogy(rounds[1:], [r["bound_constant"] / t for t in c], "--", color="grey",
                            label="bound β·E log(1/π_ref(y*))/t (α = 0)")
    axes[0, 0].axhline(r["target"], color="black", lw=0.8, ls=":", label=f"target {r['target']:g}")
    axes[0, 0].set(xlabel="round t", ylabel="gap(π̂_t)", title="(d) tabular, exact log-space APO: sub-optimality")
    axes[0, 1].set(xlabel="effective step c_t (π̂_t ∝ π_ref·exp(c_t·r*/β))", ylabel="gap(π̂_t)",
                   title="same runs against c_t: one curve, APO only moves along it faster")
    axes[1, 0].set(xlabel="round t", ylabel="gap(π̂_t)",
                   title="parameter-space APO: linear-softmax (—) and MLP (⋯)")
    axes[1, 1].set(xlabel="round t", ylabel="E_x KL(log-space update ‖ parameter-space update)",
                   title="how far the parameter-space update is from the exact one")
    for ax in axes[0]:
        ax.legend(fontsize=7, ncol=2, loc="upper right")
    from matplotlib.lines import Line2D  # one legend for the bottom row: colour = α, line style = policy

    handles = [Line2D([], [], color=colors[a], lw=3, label=f"α = {a:g}") for a in alphas]
    handles += [Line2D([], [], color="grey", marker="o", ls="-", label="linear-softmax"),
                Line2D([], [], color="grey", marker="^", ls=":", label="MLP")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# (e) -----------------------------------------------------------------------------------------------------

FIXED_POINT_RATIO = 2.0  # π** is a fixed point when ‖mean gradient at π**‖ < this × the noise level...
ROUNDING = 1e-12  # ...or is zero up to rounding (the whole pool, winners in closed form: exactly zero)
DEFAULTS = {"mcpo_cd": ("cd", "with replacement, y_w in"), "mcpo": ("random", "without replacement, y_w out")}


def is_fixed_point(check: dict) -> bool:
    return check["norm"] < FIXED_POINT_RATIO * check["noise"] or check["norm"] < ROUNDING


def _ratio(check: dict) -> str:
    ratio = "0 (rounding)" if check["norm"] < ROUNDING else f"{check['norm'] / check['noise']:.3g}×"
    return f"{_num(check['norm'])} / {_num(check['noise'])} = {ratio}"


def _final_kl(row: dict) -> tuple[float, float, float]:
    final = [curve[-1] for curve in row["curves"]]
    return sum(final) / len(final), min(final), max(final)


def _kl_at(row: dict, index: int) -> float:
    return sum(curve[index] for curve in row["curves"]) / len(row["curves"])


def report_mcpo(r: dict, cfg: DictConfig) -> str:
    normaliser, training = r["normaliser"], r["training"]
    rows = [[str(row["M"]), f"{_num(row['plain']['bias'])} ± {_num(row['plain']['bias_stderr'])}",
             _num(row["plain"]["variance"]), f"{_num(row['loss']['bias'])} ± {_num(row['loss']['bias_stderr'])}",
             _num(row["loss"]["variance"])] for row in normaliser["rows"]]
    t, variants = cfg.mcpo.training, training["variants"]
    steps, quarter = training["steps"][-1], len(training["steps"]) // 4
    k, m = training["pool_size"], training["num_negatives"]
    by = {(v["loss"], v["sampler"], v["settings"]): v for v in variants}
    default = {loss: by.get((loss, *pick)) for loss, pick in DEFAULTS.items()}
    whole = {loss: by.get((loss, "dataset", "whole pool, M = K − 1")) for loss in DEFAULTS}
    ratios = [v["at_optimum"]["norm"] / v["at_optimum"]["noise"] for v in variants
              if is_fixed_point(v["at_optimum"]) and v["at_optimum"]["norm"] >= ROUNDING]
    biased_ratios = [v["at_optimum"]["norm"] / v["at_optimum"]["noise"] for v in variants
                     if not is_fixed_point(v["at_optimum"])]

    def table(loss: str) -> str:
        lines = []
        for v in (v for v in variants if v["loss"] == loss):
            mean, low, high = _final_kl(v)
            bold = "**" if v is default[loss] else ""
            lines.append([f"{bold}`{v['sampler']}`{bold}", v["settings"] or "—",
                          "**yes**" if is_fixed_point(v["at_optimum"]) else "no", _ratio(v["at_optimum"]),
                          f"{_num(mean)} [{_num(low)} – {_num(high)}]", f"{v['grad_sequences']:.2f}",
                          str(v["scored_sequences"])])
        return _table(["sampler", "settings", "π** fixed point", "‖mean ∇ at π**‖ / noise",
                       f"E_x KL(π** ‖ π_θ) at step {steps}, mean [min – max]", "sequences with grad",
                       "without grad"], lines)

    def names(loss: str, fixed: bool) -> str:
        picked = [f"`{v['sampler']}`" + (f" ({v['settings']})" if v["settings"] else "") for v in variants
                  if v["loss"] == loss and is_fixed_point(v["at_optimum"]) == fixed]
        return ", ".join(picked) or "none"

    def kl(v: dict | None) -> str:
        return _num(_final_kl(v)[0]) if v else "—"

    def verdict(v: dict | None) -> str:
        if v is None:
            return "not run"
        return "a fixed point" if is_fixed_point(v["at_optimum"]) else "**not** a fixed point (its gradient is biased)"

    predicted = [v for v in variants if "predicted" in v]
    shifted = "; ".join(f"{v['label']}: at π** {_ratio(v['at_optimum'])}, at {v['predicted']['policy']} "
                        f"{_ratio(v['predicted'])} ({'a fixed point' if is_fixed_point(v['predicted']) else 'not one either'})"
                        for v in predicted)
    cd, rnd, paper = default["mcpo_cd"], default["mcpo"], by.get(("mcpo", "cd", "without replacement, y_w out"))
    mixed = [by.get(("mcpo", "random", s)) for s in ("with replacement, y_w out", "without replacement, y_w in")]
    mixed_ratios = ", ".join(f"{v['at_optimum']['norm'] / v['at_optimum']['noise']:.3g}×" for v in mixed if v)
    linear = [by.get(("mcpo_cd", s, settings)) for s, settings in
              (("random", "with replacement, y_w in"), ("reward", ""), ("dataset", "whole pool, M = K − 1"))]
    linear_kls = ", ".join(kl(v) for v in linear if v)
    compare = ""
    if cd and rnd:
        (cd_mean, cd_low, cd_high), (rnd_mean, rnd_low, rnd_high) = _final_kl(cd), _final_kl(rnd)
        overlap = cd_low <= rnd_high and rnd_low <= cd_high
        compare = (f"On this bandit the two defaults end {'within' if overlap else 'outside'} each other's seed range "
                   f"({_num(cd_mean)} [{_num(cd_low)} – {_num(cd_high)}] against {_num(rnd_mean)} [{_num(rnd_low)} – "
                   f"{_num(rnd_high)}]): the testbed shows that both are consistent and what each costs"
                   + (", not that one learns better." if overlap else "."))
    consistent_quarter = ", ".join(f"{v['label']} {_num(_kl_at(v, quarter))}" for v in variants
                                   if is_fixed_point(v["at_optimum"]))
    return f"""## (e) MC-PO: the normaliser estimate, and which loss × sampler keeps π**

**The normaliser.** MC-PO reads preference optimisation as the NLL of y_w under p_θ(y|x) = π_ref(y|x)·exp(r_θ(x, y))/Z_θ(x)
and estimates Z_θ with the negatives as Monte Carlo samples. We take Z(x) = Σ_y π_ref(y|x)·exp r*(x, y) (the
normaliser at the optimum, r_θ = r* + const), draw M negatives from π_ref and y_w from p* ∝ π_ref·exp r*, and
compare two estimates of log Z over {cfg.mcpo.normaliser.repeats:,} repetitions per prompt: *plain* log((1/M)·Σ_j exp r_j),
and the one *inside the loss*, log((exp r_w + Σ_j exp r_j)/(M + 1)) (−log softmax is −r_w plus it, up to log(M + 1)).
Before the log the plain estimate is unbiased with Var(Ẑ/Z) = {_num(normaliser['relative_variance_of_z_times_m'])}/M (exact).

{_table(["M", "bias, plain", "variance, plain", "bias, in the loss", "variance, in the loss"], rows)}

Both biases fall like 1/M, with opposite signs: Jensen makes the plain log-estimate too small; y_w, drawn from
p* and so biased towards large r, makes the in-loss one too large (the InfoNCE bound). Variances fall like 1/M.

**Every loss × sampler that `prefrun train` offers.** Data as the training loop sees it: per prompt,
{t.pools_per_prompt} fixed pools of K = {k} candidates drawn from π_ref, the preferred y_w picked by the Luce rule on r* (for
K = 2 that is Bradley–Terry) and put in column 0. A step does what the LLM loop does (`mcpo_batch_loss`): the
sampler scores the whole pool without gradient (`kernel_scores`, r_θ = β·(log π_θ − log π_ref), `score=reward`),
draws M = {m} columns (`prefrun.samplers`: `CDSampler`, `RandomSampler`, `HardestSampler`, `RewardSampler`;
`DatasetSampler` takes the whole pool, M = K − 1, unscored), and the columns [y_w, draws…] gathered from the pool go
through the loss: `mcpo` = `prefrun.losses.mcpo_loss`, −log softmax over them; `mcpo_cd` = `mcpo_cd_loss`,
−r_w + the mean r_θ of the draws (which may repeat and, when y_w is in, be y_w). `reward` takes the lowest judge
scores (here the judge is r*). A tabular policy from π_ref, Adam (lr {t.lr}, {t.batch_size} pools a step), {steps} steps, on the same
{t.seeds} pool sets and batch order for every pairing; KL is E_x KL(π** ‖ π_θ).

**Is π** a fixed point?** The mean gradient of the pairing's loss at π_θ = π** over {t.stationarity_pools:,} fresh pools per
prompt (the Luce winner in closed form: each candidate in turn as y_w, weighted by its probability), in 32
independent chunks, beside the norm that sampling noise alone (pools, draws) would give the mean. Rule: **yes** iff
‖mean ∇‖ < {FIXED_POINT_RATIO:g} × noise (or < {ROUNDING:g}: the whole pool's gradient is zero up to rounding once the winner
is averaged out). Here the pairings called fixed points sit at {min(ratios, default=0):.3g}–{max(ratios, default=0):.3g}× the noise and
the others at {min(biased_ratios, default=0):.3g}–{max(biased_ratios, default=0):.3g}×.
**Cost** per pool and step: *with grad*, the distinct candidates among [y_w, draws] (a repeat, or a draw that is y_w,
needs no further forward or backward), mean over steps; *without grad*, the scoring pass over the K candidates for
the samplers that rank by the policy's score (`cd`, `hardest`), 0 for the others. The training loop scores every
pool anyway (no grad) for the logged whole-pool loss and the hardness metrics, so there every pool sampler pays K.

`loss=mcpo` (log-softmax over [y_w, draws]):

{table("mcpo")}

`loss=mcpo_cd` (−r_w + mean of the draws' r_θ):

{table("mcpo_cd")}

**What comes out.** π** is a fixed point of `mcpo` with {names("mcpo", True)} only, and of `mcpo_cd` with
{names("mcpo_cd", True)} only (τ = 1, `score=reward`); every other pairing in the tables is biased.

*Why, for `mcpo_cd`:* with i.i.d. draws ∝ softmax(r_θ) from the whole pool, y_w included, the mean of the draws'
∇r_θ has expectation Σ_i softmax(r_θ)_i·∇r_i, so the expected gradient is the whole-pool log-softmax's, whose
minimiser is π** (the Luce winner's law is softmax(r*)); a draw that is y_w cancels its share of −r_w, which is what
stops the push at the optimum. Every other switch breaks that identity: without y_w the loss keeps pushing y_w up,
without replacement the draws are not i.i.d. softmax. A temperature τ ≠ 1 or `score=logp` keeps a fixed point but
at another policy, checked the same way: {shifted or '—'}. (There the draws and the gradient with respect to the
logits are exactly those of τ = 1 at π**, hence the same numbers.) So τ acts as β/τ, and `score=logp` loses π_ref
and β altogether. With `random`, `reward`, `dataset` the draws do not depend on θ: the loss is linear in r_θ, its gradient
never vanishes and the policy runs off (KL at step {steps}: {linear_kls}).

*Why, for `mcpo`:* the log-softmax keeps π** when y_w and the draws are exchangeable given the candidates they
name. Without replacement from the pool minus y_w they form a uniform random subset containing the winner, and by
the Luce rule's independence of irrelevant alternatives the pool's winner is that subset's Luce winner; with
replacement from the whole pool, y_w included, P(y_w = a | the multiset) ∝ (multiplicity of a)·exp r*_a, which is
what the softmax over repeated columns computes. The two mixed switches of `random` break exchangeability: a
small bias ({mixed_ratios} the noise, hardly visible in the KL at M = {m} of K = {k}, but there). CD negatives, in any
form, are drawn ∝ exp r_θ *and* weighted again by the softmax, so hard negatives count twice; `hardest` is the τ → 0
extreme of that, and `reward` picks the negative by r*, which no longer leaves it exchangeable with the winner.
The paper's reading, `mcpo` × `cd` without replacement and without y_w, ends at KL {kl(paper)} against
{kl(rnd)} for `random` and {kl(whole['mcpo'])} for the whole pool.

**Defaults, from these numbers.** `loss=mcpo_cd sampler=cd` with replacement and y_w included, τ = 1,
`score=reward` (the `CDSampler` defaults): π** is {verdict(cd)}, KL {kl(cd)} at step {steps} against
{kl(whole['mcpo'])} for the whole-pool log-softmax, at {cd['grad_sequences'] if cd else float('nan'):.2f} sequences with
gradient per pool instead of K = {k} (a draw that is y_w, or repeats the other, costs nothing; at π** the CD weights
over a pool have a Kish effective sample size of {training['effective_sample_size']:.2f} of {k}, `effective_sample_size`), plus the no-grad
scoring pass the loop runs anyway. It is the one CD pairing that is consistent. With `loss=mcpo`, the default is `sampler=random` (without
replacement, y_w out, the `RandomSampler` defaults): π** is {verdict(rnd)}, KL {kl(rnd)}, {rnd['grad_sequences'] if rnd else float('nan'):.2f}
sequences with gradient and no score needed. {compare} Mean KL at step {training['steps'][quarter]} of the consistent
pairings (how fast they start): {consistent_quarter}. The other pairings run, with a warning (`prefrun.samplers.bias_warning`).
Not exercised here: `sampler.refresh_every` (scores are fresh every step) and `length_normalize` (one-entry
sequences).
The resampling argument is exact because these pools are drawn from π_ref (the weight p_θ/π_ref ∝ exp r_θ); for
pools written by other models (UltraFeedback) the proposal is unknown and the same rule is a heuristic."""


def plot_mcpo(r: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(19, 11.5))
    rows = r["normaliser"]["rows"]
    ms = [row["M"] for row in rows]
    for name, color, label in (("plain", "tab:blue", "plain: log((1/M)·Σ exp r_j)"),
                               ("loss", "tab:red", "in the loss: log((exp r_w + Σ exp r_j)/(M+1))")):
        axes[0, 0].errorbar(ms, [row[name]["bias"] for row in rows],
                            yerr=[2 * row[name]["bias_stderr"] for row in rows], fmt="o-", color=color, capsize=3,
                            label=label)
        axes[0, 1].loglog(ms, [row[name]["variance"] for row in rows], "o-", color=color, label=label)
    axes[0, 1].loglog(ms, [rows[0]["plain"]["variance"] * ms[0] / m for m in ms], ":", color="grey", label="∝ 1/M")
    axes[0, 0].axhline(0, color="black", lw=0.8)
    axes[0, 0].set_xscale("log", base=2)
    axes[0, 0].set(xlabel="negatives M", ylabel="bias of log Ẑ (± 2 s.e.)", title="(e) normaliser estimate: bias")
    axes[0, 1].set(xlabel="negatives M", ylabel="variance of log Ẑ", title="normaliser estimate: variance")
    for ax in axes[0, :2]:
        ax.legend(fontsize=8)
    training = r["training"]
    variants = training["variants"]
    labels = [v["label"] for v in variants]
    ratios = [max(v["at_optimum"]["norm"] / v["at_optimum"]["noise"], 1e-3) if v["at_optimum"]["norm"] >= ROUNDING
              else 1e-3 for v in variants]
    fixed = [is_fixed_point(v["at_optimum"]) for v in variants]
    bars = axes[0, 2]
    bars.barh(range(len(variants)), ratios, color=["tab:green" if f else "tab:red" for f in fixed])
    bars.axvline(FIXED_POINT_RATIO, color="black", ls="--", lw=1, label=f"{FIXED_POINT_RATIO:g} × noise (the rule)")
    bars.set_xscale("log")
    bars.set_yticks(range(len(variants)), labels, fontsize=6)
    bars.invert_yaxis()
    bars.set(xlabel="‖mean ∇ at π**‖ / noise level (whole pool: 0, drawn at 1e-3)",
             title="is π** a fixed point? green: yes, red: no")
    bars.legend(fontsize=8)
    palette = list(plt.cm.tab10.colors) + ["black"]
    for ax, loss in zip(axes[1, :2], ("mcpo", "mcpo_cd")):
        for i, v in enumerate(v for v in variants if v["loss"] == loss):
            stacked, color = torch.tensor(v["curves"]), palette[i % len(palette)]
            style = "-" if is_fixed_point(v["at_optimum"]) else "--"
            ax.semilogy(training["steps"], stacked.mean(0), style, color=color,
                        label=v["label"].removeprefix(f"{loss} × "))
            ax.fill_between(training["steps"], stacked.min(0).values, stacked.max(0).values, color=color, alpha=0.15)
        ax.set(xlabel="training step", ylabel="E_x KL(π** ‖ π_θ)  (mean, min–max over seeds)",
               title=f"loss={loss}, M = {training['num_negatives']} of a pool of {training['pool_size']} "
                     "(—: π** a fixed point, --: not)")
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    cost = axes[1, 2]
    for loss, marker in (("mcpo", "o"), ("mcpo_cd", "s")):
        picked = [v for v in variants if v["loss"] == loss]
        cost.scatter([v["grad_sequences"] for v in picked], [_final_kl(v)[0] for v in picked], marker=marker, s=40,
                     c=["tab:green" if is_fixed_point(v["at_optimum"]) else "tab:red" for v in picked])
        cost.scatter([], [], marker=marker, color="grey", label=f"loss={loss}")
    consistent = [v for v in variants if is_fixed_point(v["at_optimum"])]
    for i, v in enumerate(sorted(consistent, key=lambda v: _final_kl(v)[0])):
        cost.annotate(v["label"], (v["grad_sequences"], _final_kl(v)[0]), fontsize=7, textcoords="offset points",
                      xytext=(6, 10 + 12 * i), arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})
    cost.set_yscale("log")
    cost.set(xlabel="sequences with gradient per pool and step", ylabel=f"E_x KL at step {training['steps'][-1]}",
             title="cost against result (green: π** a fixed point, red: not)")
    cost.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
