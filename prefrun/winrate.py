"""The statistics of judged pairwise evaluation: win rates, position bias, length control, intervals.

A judged pair is one output of the model and one of the baseline for the same prompt, with the judge's soft
preference p = P(model's output beats the baseline's) in [0, 1] (a tie is 0.5). Several pairs may share a
prompt (several completions per side, all pairs): every figure averages within a prompt first, then over
prompts, so each prompt weighs the same, and the bootstrap resamples prompts, not pairs. Pure functions of
numbers (numpy only); docs/evaluation.md (Metrics) gives the formulas and the choices.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

Numbers = Sequence[float] | np.ndarray
StatisticName = Literal["win_rate", "hard_win_rate", "tie_rate", "position_bias_rate", "lc_win_rate"]

# Bootstrap work is done in blocks of resamples of about this many (resample, pair) cells: bounded memory.
_BLOCK_CELLS = 1 << 18

# lambda of the LC fit's ridge lambda / 2 * length_coef**2, beside a log-likelihood in which each prompt
# weighs 1: a N(0, 1 / lambda) prior (sd 3.2) on the coefficient of a feature bounded by 1. It keeps that
# coefficient, and so the model's term, finite where lengths separate wins from losses; negligible on
# hundreds of prompts (docs/evaluation.md, Metrics).
DEFAULT_LENGTH_RIDGE = 0.1


@dataclass(frozen=True)
class JudgedPairs:
    """Checked per-pair columns (float64, one row per pair) and each pair's prompt as a code.

    `prompt_codes[i]` indexes `prompt_ids` (the caller's ids, in order of first appearance).
    """

    preferences: np.ndarray
    model_lengths: np.ndarray
    baseline_lengths: np.ndarray
    prompt_codes: np.ndarray
    prompt_ids: tuple[Hashable, ...]
    forward: np.ndarray | None = None
    backward: np.ndarray | None = None
    difficulties: np.ndarray | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.preferences.size)

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids)


class Estimate(NamedTuple):
    """A statistic on all prompts and its percentile bootstrap interval over prompts."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class LengthGLM:
    """AlpacaEval 2's length-controlled GLM fitted to judged pairs, and its win rate at equal lengths.

    logit P(model wins) = length_coef * tanh((model_length - baseline_length) / length_std)
                          + difficulty_coef * difficulty + model_coef
    (AlpacaEval writes the difference as baseline - model, so its length coefficient has the other sign.)
    By default length_coef carries a small ridge and model_coef none (fit_length_glm).
    """

    lc_win_rate: float
    length_coef: float
    difficulty_coef: float  # 0.0 without difficulties
    model_coef: float
    length_std: float  # 0.0 when the length differences do not vary: the length feature is then 0


# ---------------------------------------------------------------------------------------------- input checks


def _column(
    values: Numbers, name: str, num_rows: int | None = None, reference: str = "preferences"
) -> np.ndarray:
    """`values` as a 1-d float64 array of finite numbers, one per pair (`num_rows` of them when given)."""
    try:
        column = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numbers, one per pair: {error}") from None
    if column.ndim != 1:
        raise ValueError(f"{name} must be one number per pair, got an array of shape {column.shape}")
    if num_rows is None and column.size == 0:
        raise ValueError(f"no pairs: {name} is empty")
    if num_rows is not None and column.size != num_rows:
        raise ValueError(f"{name} has {column.size} rows but {reference} has {num_rows}: give one per pair")
    not_finite = np.flatnonzero(~np.isfinite(column))
    if not_finite.size:
        row = int(not_finite[0])
        raise ValueError(f"{name} must be finite numbers (no NaN or inf); row {row} is {column[row]}")
    return column


def _preference_column(
    values: Numbers, name: str, num_rows: int | None = None, reference: str = "preferences"
) -> np.ndarray:
    column = _column(values, name, num_rows, reference)
    outside = np.flatnonzero((column < 0.0) | (column > 1.0))
    if outside.size:
        row = int(outside[0])
        raise ValueError(
            f"{name} must lie in [0, 1] (P(model's output beats the baseline's)); row {row} is {column[row]}"
        )
    return column


def _length_column(values: Numbers, name: str, num_rows: int, reference: str) -> np.ndarray:
    column = _column(values, name, num_rows, reference)
    negative = np.flatnonzero(column < 0.0)
    if negative.size:
        row = int(negative[0])
        raise ValueError(f"{name} must be lengths in characters (>= 0); row {row} is {column[row]}")
    return column


def _prompt_codes(
    prompts: Sequence[Hashable] | None, num_rows: int
) -> tuple[np.ndarray, tuple[Hashable, ...]]:
    """Each row's prompt as a code 0..K-1 (order of first appearance); no prompts: each pair its own."""
    if prompts is None:
        return np.arange(num_rows), tuple(range(num_rows))
    prompts = list(prompts)
    if len(prompts) != num_rows:
        raise ValueError(f"prompts has {len(prompts)} rows but preferences has {num_rows}: give one per pair")
    codes: dict[Hashable, int] = {}
    try:
        row_codes = np.array([codes.setdefault(prompt, len(codes)) for prompt in prompts], dtype=np.int64)
    except TypeError as error:
        raise ValueError(f"prompts must be ids (integers or strings), one per pair: {error}") from None
    return row_codes, tuple(codes)


def judged_pairs(
    preferences: Numbers | None,
    model_lengths: Numbers,
    baseline_lengths: Numbers,
    prompts: Sequence[Hashable] | None = None,
    *,
    forward: Numbers | None = None,
    backward: Numbers | None = None,
    difficulties: Numbers | None = None,
) -> JudgedPairs:
    """Checked judged pairs; `preferences=None` takes the order-symmetrised (forward + backward) / 2.

    forward / backward: the judge's preference for the model's output when shown first / second.
    difficulties: a per-instruction difficulty per pair (AlpacaEval's term), for the length-controlled fit.
    """
    if (forward is None) != (backward is None):
        raise ValueError("position bias needs both forward and backward preferences (or neither)")
    if preferences is None and forward is None:
        raise ValueError("no preferences: give preferences, or forward and backward")
    if forward is not None:
        forward = _preference_column(forward, "forward")
        backward = _preference_column(backward, "backward", forward.size, "forward")
    if preferences is None:
        preferences = symmetrised_preferences(forward, backward)
    preferences = _preference_column(preferences, "preferences")
    num_rows = preferences.size
    if forward is not None and forward.size != num_rows:
        raise ValueError(f"forward has {forward.size} rows but preferences has {num_rows}: give one per pair")
    codes, ids = _prompt_codes(prompts, num_rows)
    return JudgedPairs(
        preferences=preferences,
        model_lengths=_length_column(model_lengths, "model_lengths", num_rows, "preferences"),
        baseline_lengths=_length_column(baseline_lengths, "baseline_lengths", num_rows, "preferences"),
        prompt_codes=codes,
        prompt_ids=ids,
        forward=forward,
        backward=backward,
        difficulties=None if difficulties is None else _column(difficulties, "difficulties", num_rows),
    )


# ---------------------------------------------------------------------------------- per-pair quantities


def hard_verdicts(preferences: Numbers) -> np.ndarray:
    """Each pair's hard verdict: 1 if p > 0.5, 0.5 if p == 0.5 (a tie), 0 if p < 0.5."""
    return 0.5 + 0.5 * np.sign(np.asarray(preferences, dtype=np.float64) - 0.5)


def position_flips(forward: Numbers, backward: Numbers) -> np.ndarray:
    """Per pair, how far the hard verdict moves when the order is swapped: win <-> loss 1, tie <-> either 0.5.

    Symmetric in model and baseline (p -> 1 - p leaves it unchanged), unlike a plain (f > 0.5) != (b > 0.5).
    """
    return np.abs(hard_verdicts(forward) - hard_verdicts(backward))


def symmetrised_preferences(forward: Numbers, backward: Numbers) -> np.ndarray:
    """The preference averaged over both orders, (forward + backward) / 2: an "always A" judge gives 0.5."""
    return (np.asarray(forward, dtype=np.float64) + np.asarray(backward, dtype=np.float64)) / 2.0


# ---------------------------------------------------------------------------- reweighted prompt averages
# A statistic is computed under R reweightings of the prompts at once: prompt_weights has shape (R, K), row r
# saying how often each prompt is drawn in resample r (all ones: the data as they are).


def _prompt_means(values: np.ndarray, codes: np.ndarray, num_prompts: int) -> np.ndarray:
    """Each prompt's mean over its pairs."""
    sums = np.bincount(codes, weights=values, minlength=num_prompts)
    return sums / np.bincount(codes, minlength=num_prompts)


def _reweighted_means(values: np.ndarray, pairs: JudgedPairs, prompt_weights: np.ndarray) -> np.ndarray:
    """The weighted mean over prompts of each prompt's mean, one per row of prompt_weights."""
    means = _prompt_means(values, pairs.prompt_codes, pairs.num_prompts)
    return prompt_weights @ means / prompt_weights.sum(axis=1)


def _row_weights(pairs: JudgedPairs, prompt_weights: np.ndarray) -> np.ndarray:
    """(R, num_pairs): each pair weighs its prompt's weight over the prompt's number of pairs."""
    pairs_per_prompt = np.bincount(pairs.prompt_codes, minlength=pairs.num_prompts)
    return prompt_weights[:, pairs.prompt_codes] / pairs_per_prompt[pairs.prompt_codes]


def _win_rates(pairs: JudgedPairs, prompt_weights: np.ndarray) -> np.ndarray:
    return _reweighted_means(pairs.preferences, pairs, prompt_weights)


def _hard_win_rates(pairs: JudgedPairs, prompt_weights: np.ndarray) -> np.ndarray:
    return _reweighted_means(hard_verdicts(pairs.preferences), pairs, prompt_weights)


def _tie_rates(pairs: JudgedPairs, prompt_weights: np.ndarray) -> np.ndarray:
    return _reweighted_means((pairs.preferences == 0.5).astype(np.float64), pairs, prompt_weights)


def _position_bias_rates(pairs: JudgedPairs, prompt_weights: np.ndarray) -> np.ndarray:
    if pairs.forward is None or pairs.backward is None:
        raise ValueError(
            "position_bias_rate needs forward and backward preferences (judged_pairs(forward=...))"
        )
    return _reweighted_means(position_flips(pairs.forward, pairs.backward), pairs, prompt_weights)


def _lc_win_rates(pairs: JudgedPairs, prompt_weights: np.ndarray) -> np.ndarray:
    return _length_glm_fits(pairs, prompt_weights, l1_penalty=0.0, length_ridge=DEFAULT_LENGTH_RIDGE)[0]


_STATISTICS: dict[str, Callable[[JudgedPairs, np.ndarray], np.ndarray]] = {
    "win_rate": _win_rates,
    "hard_win_rate": _hard_win_rates,
    "tie_rate": _tie_rates,
    "position_bias_rate": _position_bias_rates,
    "lc_win_rate": _lc_win_rates,
}


def _statistic(name: str) -> Callable[[JudgedPairs, np.ndarray], np.ndarray]:
    if name not in _STATISTICS:
        raise ValueError(f"unknown statistic {name!r}; choose one of {sorted(_STATISTICS)}")
    return _STATISTICS[name]


def _on_all_prompts(statistic: Callable[[JudgedPairs, np.ndarray], np.ndarray], pairs: JudgedPairs) -> float:
    return float(statistic(pairs, np.ones((1, pairs.num_prompts)))[0])


# -------------------------------------------------------------------------------------- plain statistics


def _prompt_average(values: np.ndarray, prompts: Sequence[Hashable] | None) -> float:
    codes, ids = _prompt_codes(prompts, values.size)
    return float(_prompt_means(values, codes, len(ids)).mean())


def win_rate(preferences: Numbers, prompts: Sequence[Hashable] | None = None) -> float:
    """Mean soft preference: averaged within each prompt, then over prompts (each prompt weighs the same)."""
    return _prompt_average(_preference_column(preferences, "preferences"), prompts)


def hard_win_rate(preferences: Numbers, prompts: Sequence[Hashable] | None = None) -> float:
    """Mean hard verdict (win 1, tie 0.5, loss 0), averaged within each prompt, then over prompts."""
    return _prompt_average(hard_verdicts(_preference_column(preferences, "preferences")), prompts)


def tie_rate(preferences: Numbers, prompts: Sequence[Hashable] | None = None) -> float:
    """Share of pairs judged exactly 0.5, averaged within each prompt, then over prompts."""
    ties = _preference_column(preferences, "preferences") == 0.5
    return _prompt_average(ties.astype(np.float64), prompts)


def position_bias_rate(
    forward: Numbers, backward: Numbers, prompts: Sequence[Hashable] | None = None
) -> float:
    """Share of pairs whose hard verdict flips when the order is swapped (to or from a tie counts 0.5)."""
    forward = _preference_column(forward, "forward")
    backward = _preference_column(backward, "backward", forward.size, "forward")
    return _prompt_average(position_flips(forward, backward), prompts)


# --------------------------------------------------------------------------------- length-controlled GLM


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -logits))


def _soft_log_loss(
    features: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    coefs: np.ndarray,
    l1_penalty: float,
    ridges: np.ndarray,
) -> np.ndarray:
    """Per fit: sum_i w_i * CE(y_i, sigmoid(x_i . c)) + l1_penalty * |c|_1 + sum_j ridges_j * c_j**2 / 2."""
    logits = np.einsum("rnd,rd->rn", features, coefs)
    cross_entropy = np.logaddexp(0.0, logits) - targets * logits
    penalty = l1_penalty * np.abs(coefs).sum(axis=1) + 0.5 * (ridges * coefs**2).sum(axis=1)
    return (weights * cross_entropy).sum(axis=1) + penalty


def _l1_newton_direction(
    gradient: np.ndarray, hessian: np.ndarray, coefs: np.ndarray, l1_penalty: float, sweeps: int = 100
) -> np.ndarray:
    """argmin_s g.s + s.H.s / 2 + l1 |c + s|_1 by coordinate descent (a proximal Newton step, as GLMNET's)."""
    step = np.zeros_like(coefs)
    for _ in range(sweeps):
        for j in range(coefs.shape[1]):
            curvature = hessian[:, j, j]
            slope = gradient[:, j] + np.einsum("rd,rd->r", hessian[:, j, :], step) - curvature * step[:, j]
            shrunk = np.sign(curvature * coefs[:, j] - slope) * np.maximum(
                np.abs(curvature * coefs[:, j] - slope) - l1_penalty, 0.0
            )
            target = np.divide(shrunk, curvature, out=np.zeros_like(shrunk), where=curvature > 0)
            step[:, j] = target - coefs[:, j]
    return step


def _fit_soft_logistic(
    features: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    l1_penalty: float = 0.0,
    ridges: np.ndarray | None = None,
    max_iterations: int = 100,
    tolerance: float = 1e-11,
) -> np.ndarray:
    """R weighted logistic regressions on soft targets at once: features (R, n, d), weights (R, n) -> (R, d).

    Minimises sum_i w_i * CE(y_i, sigmoid(x_i . c)) + l1_penalty * |c|_1 + sum_j ridges_j * c_j**2 / 2
    (ridges: one L2 strength per coefficient, default none): with y soft and no ridge this is exactly
    AlpacaEval's fit, which duplicates each row with label 1 (weight y) and label 0 (weight 1 - y).
    Newton (proximal Newton with an L1 penalty) with a backtracking line search, in float64. Along a
    direction that no penalty bounds and the data separate (the model's term when all are wins, say) the
    coefficients grow until the gradient vanishes: the fit stops at its limit (LC 1.0 for all wins).
    """
    num_fits, _, dims = features.shape
    ridges = np.zeros(dims) if ridges is None else np.asarray(ridges, dtype=np.float64)
    coefs = np.zeros((num_fits, dims))
    running = np.arange(num_fits)
    for _ in range(max_iterations):
        x, w, c = features[running], weights[running], coefs[running]
        probs = _sigmoid(np.einsum("rnd,rd->rn", x, c))
        gradient = np.einsum("rn,rnd->rd", w * (probs - targets), x) + ridges * c
        hessian = np.swapaxes(x * (w * probs * (1.0 - probs))[..., None], 1, 2) @ x + np.diag(ridges)
        if l1_penalty > 0:
            step = _l1_newton_direction(gradient, hessian, c, l1_penalty)
        else:
            # a tiny ridge only keeps a zero feature (equal lengths) or a collinear one solvable; g is 0 there
            ridge = 1e-12 * (np.trace(hessian, axis1=1, axis2=2)[:, None, None] / dims + 1e-300)
            step = -np.linalg.solve(hessian + ridge * np.eye(dims), gradient[..., None])[..., 0]
        # backtracking (Armijo on the full objective, L1 included): Newton from 0 can overshoot
        objective = _soft_log_loss(x, targets, w, c, l1_penalty, ridges)
        decrease = (gradient * step).sum(axis=1) + l1_penalty * (np.abs(c + step).sum(1) - np.abs(c).sum(1))
        scale = np.ones(len(running))
        for _ in range(50):
            trial = _soft_log_loss(x, targets, w, c + scale[:, None] * step, l1_penalty, ridges)
            slack = 1e-13 * np.abs(objective)  # rounding at the optimum must not stall the search
            too_far = trial > objective + 1e-4 * scale * decrease + slack
            if not too_far.any():
                break
            scale = np.where(too_far, scale / 2.0, scale)
        moved = scale[:, None] * step
        coefs[running] = c + moved
        # converged: the step vanished, or (no penalty) the gradient did, as it does on separable data
        small_step = np.abs(moved).max(axis=1) <= tolerance * (1.0 + np.abs(c).max(axis=1))
        small_gradient = np.abs(gradient).max(axis=1) <= 1e-13 * w.sum(axis=1)
        done = small_step | (small_gradient if l1_penalty == 0 else False)
        running = running[~done]
        if running.size == 0:
            break
    return coefs


def _length_stds(length_differences: np.ndarray, row_weights: np.ndarray) -> np.ndarray:
    """Per fit, the weighted standard deviation of the length differences, Bessel-corrected over prompts
    (pandas' ddof=1 for one pair per prompt); exactly 0 when the weighted pairs' differences do not vary."""
    total = row_weights.sum(axis=1)  # the number of prompts drawn
    mean = row_weights @ length_differences / total
    squares = (row_weights * (length_differences - mean[:, None]) ** 2).sum(axis=1)
    variance = squares / np.maximum(total - 1.0, 1e-300)
    # tested on the values themselves: a rounded mean would leave a tiny std and blow up the 0/0 case
    drawn = row_weights > 0
    largest = np.where(drawn, length_differences, -np.inf).max(axis=1)
    smallest = np.where(drawn, length_differences, np.inf).min(axis=1)
    return np.where((largest > smallest) & (total > 1.0), np.sqrt(variance), 0.0)


def _length_glm_fits(
    pairs: JudgedPairs, prompt_weights: np.ndarray, l1_penalty: float, length_ridge: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of prompt_weights: (LC win rate, coefficients [length, (difficulty), model], length std)."""
    length_differences = pairs.model_lengths - pairs.baseline_lengths
    block = max(1, _BLOCK_CELLS // pairs.num_pairs)
    lc_rates, coefs, stds = [], [], []
    for start in range(0, len(prompt_weights), block):
        row_weights = _row_weights(pairs, prompt_weights[start : start + block])
        std = _length_stds(length_differences, row_weights)
        # AlpacaEval's std_delta_len: the difference over its std, not centred; 0 when the std is 0 (0/0)
        standardised = np.divide(
            length_differences, std[:, None], out=np.zeros(row_weights.shape), where=std[:, None] > 0
        )
        columns = [np.tanh(standardised)]
        if pairs.difficulties is not None:
            columns.append(np.broadcast_to(pairs.difficulties, row_weights.shape))
        columns.append(np.ones(row_weights.shape))
        features = np.stack(columns, axis=-1)
        # the ridge on the length coefficient alone: the model's term stays free, so its score equation holds
        ridges = np.zeros(features.shape[-1])
        ridges[0] = length_ridge
        fitted = _fit_soft_logistic(features, pairs.preferences, row_weights, l1_penalty, ridges)
        # predicted at zero length difference: tanh(0) = 0 drops the length term
        at_equal_length = _sigmoid(np.einsum("rnd,rd->rn", features[..., 1:], fitted[:, 1:]))
        lc_rates.append((row_weights * at_equal_length).sum(axis=1) / row_weights.sum(axis=1))
        coefs.append(fitted)
        stds.append(std)
    return np.concatenate(lc_rates), np.concatenate(coefs), np.concatenate(stds)


def fit_length_glm(
    preferences: Numbers,
    model_lengths: Numbers,
    baseline_lengths: Numbers,
    prompts: Sequence[Hashable] | None = None,
    difficulties: Numbers | None = None,
    l1_penalty: float = 0.0,
    length_ridge: float = DEFAULT_LENGTH_RIDGE,
) -> LengthGLM:
    """AlpacaEval 2's length-controlled GLM (arXiv 2404.04475), lengths in characters, rates as fractions.

    Without difficulties the fit is AlpacaEval's `length_controlled_minimal` formula. The default fit is
    maximum likelihood with a ridge length_ridge / 2 * length_coef**2 (prompts weigh 1 each): finite when the
    lengths separate wins from losses, negligible on hundreds of prompts; the model's term is not penalised,
    so the LC win rate equals the raw one when lengths do not differ. l1_penalty = 1 / C of AlpacaEval's
    liblinear fit (which penalises every coefficient, the model's included); the two penalties add, so
    AlpacaEval's fit at C is l1_penalty=1 / C, length_ridge=0.
    """
    if l1_penalty < 0:
        raise ValueError(f"l1_penalty must be >= 0, got {l1_penalty}")
    if not length_ridge >= 0:  # NaN too
        raise ValueError(f"length_ridge must be >= 0, got {length_ridge}")
    pairs = judged_pairs(preferences, model_lengths, baseline_lengths, prompts, difficulties=difficulties)
    lc_rates, coefs, stds = _length_glm_fits(pairs, np.ones((1, pairs.num_prompts)), l1_penalty, length_ridge)
    fitted = coefs[0]
    return LengthGLM(
        lc_win_rate=float(lc_rates[0]),
        length_coef=float(fitted[0]),
        difficulty_coef=float(fitted[1]) if difficulties is not None else 0.0,
        model_coef=float(fitted[-1]),
        length_std=float(stds[0]),
    )


def length_controlled_win_rate(
    preferences: Numbers,
    model_lengths: Numbers,
    baseline_lengths: Numbers,
    prompts: Sequence[Hashable] | None = None,
    difficulties: Numbers | None = None,
    l1_penalty: float = 0.0,
    length_ridge: float = DEFAULT_LENGTH_RIDGE,
) -> float:
    """The win rate the length GLM predicts at zero length difference, a fraction (see fit_length_glm)."""
    return fit_length_glm(
        preferences, model_lengths, baseline_lengths, prompts, difficulties, l1_penalty, length_ridge
    ).lc_win_rate


# ----------------------------------------------------------------------------------------------- bootstrap


def _check_bootstrap(resamples: int, level: float) -> None:
    if int(resamples) != resamples or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1 (0.95 for a 95% interval), got {level}")


def _resampled(
    statistics: Sequence[Callable[[np.ndarray], np.ndarray]], num_prompts: int, resamples: int, seed: int
) -> np.ndarray:
    """(len(statistics), resamples): each statistic of prompt weights on the same bootstrap draws."""
    rng = np.random.default_rng(seed)
    values = np.empty((len(statistics), resamples))
    block = max(1, _BLOCK_CELLS // num_prompts)
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        drawn = rng.integers(0, num_prompts, size=(size, num_prompts))  # K prompts with replacement
        offsets = num_prompts * np.arange(size)[:, None]
        counts = np.bincount((drawn + offsets).ravel(), minlength=size * num_prompts)
        prompt_weights = counts.reshape(size, num_prompts).astype(np.float64)
        for index, statistic in enumerate(statistics):
            values[index, start : start + size] = statistic(prompt_weights)
    return values


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def bootstrap_interval(
    pairs: JudgedPairs,
    statistic: StatisticName = "win_rate",
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """The statistic on all prompts and its percentile bootstrap interval, resampling prompts with replacement
    (a prompt drawn twice counts twice; its pairs travel together)."""
    _check_bootstrap(resamples, level)
    compute = _statistic(statistic)
    draws = _resampled([lambda weights: compute(pairs, weights)], pairs.num_prompts, resamples, seed)[0]
    return Estimate(_on_all_prompts(compute, pairs), *_percentiles(draws, level))


def _prompt_permutation(pairs_a: JudgedPairs, pairs_b: JudgedPairs) -> np.ndarray:
    """For each of b's prompt codes, a's code for the same prompt; both must judge the same prompts."""
    codes_a = {prompt: code for code, prompt in enumerate(pairs_a.prompt_ids)}
    only_b = [prompt for prompt in pairs_b.prompt_ids if prompt not in codes_a]
    only_a = set(codes_a) - set(pairs_b.prompt_ids)
    if only_b or only_a:
        example = only_b[0] if only_b else next(iter(only_a))
        raise ValueError(
            f"a paired comparison needs the same prompts on both sides: {len(only_a)} prompts only in the "
            f"first, {len(only_b)} only in the second (e.g. {example!r})"
        )
    return np.array([codes_a[prompt] for prompt in pairs_b.prompt_ids], dtype=np.int64)


def paired_bootstrap_interval(
    pairs_a: JudgedPairs,
    pairs_b: JudgedPairs,
    statistic: StatisticName = "win_rate",
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """statistic(a) - statistic(b) for two systems judged on the same prompts, with a paired percentile
    bootstrap interval: each resample draws the prompts once and computes both sides on that draw."""
    _check_bootstrap(resamples, level)
    compute = _statistic(statistic)
    a_codes_of_b = _prompt_permutation(pairs_a, pairs_b)
    same_order = bool((a_codes_of_b == np.arange(pairs_a.num_prompts)).all())

    def difference(weights: np.ndarray) -> np.ndarray:
        # the same array when the prompts come in the same order: identical systems then differ by exactly 0
        return compute(pairs_a, weights) - compute(
            pairs_b, weights if same_order else weights[:, a_codes_of_b]
        )

    draws = _resampled([difference], pairs_a.num_prompts, resamples, seed)[0]
    value = _on_all_prompts(compute, pairs_a) - _on_all_prompts(compute, pairs_b)
    return Estimate(value, *_percentiles(draws, level))


def summary(
    pairs: JudgedPairs,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float | int | list[float] | None]:
    """Every figure of one model-vs-baseline evaluation as a JSON-ready dict; intervals are [low, high] from
    one shared set of bootstrap draws over prompts; position_bias_rate is None without forward/backward."""
    _check_bootstrap(resamples, level)
    with_intervals = ["win_rate", "hard_win_rate", "lc_win_rate"]
    draws = _resampled(
        [lambda weights, name=name: _STATISTICS[name](pairs, weights) for name in with_intervals],
        pairs.num_prompts,
        resamples,
        seed,
    )
    result: dict[str, float | int | list[float] | None] = {}
    for name, values in zip(with_intervals, draws):
        result[name] = _on_all_prompts(_STATISTICS[name], pairs)
        result[f"{name}_interval"] = list(_percentiles(values, level))
    result["tie_rate"] = _on_all_prompts(_tie_rates, pairs)
    has_orders = pairs.forward is not None
    result["position_bias_rate"] = _on_all_prompts(_position_bias_rates, pairs) if has_orders else None
    result["num_prompts"] = pairs.num_prompts
    result["num_pairs"] = pairs.num_pairs
    ones = np.ones((1, pairs.num_prompts))
    result["mean_model_length"] = float(_reweighted_means(pairs.model_lengths, pairs, ones)[0])
    result["mean_baseline_length"] = float(_reweighted_means(pairs.baseline_lengths, pairs, ones)[0])
    result["interval_level"] = level
    result["resamples"] = int(resamples)
    result["seed"] = seed
    return result
