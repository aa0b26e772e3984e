"""The statistics of judged pairwise evaluation (prefrun/winrate.py): hand-computed values, symmetries, the
bootstrap's coverage, and the length-controlled win rate against alpaca_eval's own implementation."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from prefrun.winrate import (
    bootstrap_interval,
    fit_length_glm,
    hard_win_rate,
    judged_pairs,
    length_controlled_win_rate,
    paired_bootstrap_interval,
    position_bias_rate,
    summary,
    symmetrised_preferences,
    tie_rate,
    win_rate,
)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def random_pairs(seed: int, num_prompts: int = 200) -> dict[str, np.ndarray]:
    """Soft preferences with some hard wins, losses and ties; lengths, difficulties."""
    rng = np.random.default_rng(seed)
    preferences = rng.beta(2.0, 1.5, num_prompts)
    preferences[:20] = 1.0
    preferences[20:30] = 0.0
    preferences[30:45] = 0.5
    return dict(
        preferences=rng.permutation(preferences),
        model_lengths=rng.integers(50, 2000, num_prompts).astype(float),
        baseline_lengths=rng.integers(50, 1500, num_prompts).astype(float),
        difficulties=rng.normal(size=num_prompts),
    )


# ------------------------------------------------------------------------------------------- plain rates


def test_win_rates_and_ties_by_hand():
    preferences = [1.0, 0.0, 0.5, 0.75]
    assert win_rate(preferences) == pytest.approx((1 + 0 + 0.5 + 0.75) / 4)  # 0.5625
    assert hard_win_rate(preferences) == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # 0.625
    assert tie_rate(preferences) == pytest.approx(1 / 4)


def test_several_pairs_per_prompt_are_averaged_within_the_prompt_first():
    preferences = [1.0, 0.0, 0.5, 0.2]
    prompts = ["a", "a", "a", "b"]
    # prompt a: mean 0.5, hard (1 + 0 + 0.5) / 3 = 0.5, ties 1/3; prompt b: 0.2, hard 0, ties 0
    assert win_rate(preferences, prompts) == pytest.approx((0.5 + 0.2) / 2)  # not the row mean 0.425
    assert hard_win_rate(preferences, prompts) == pytest.approx((0.5 + 0.0) / 2)
    assert tie_rate(preferences, prompts) == pytest.approx((1 / 3 + 0) / 2)
    # integer ids work the same and their order does not matter
    assert win_rate([0.2, 1.0, 0.0, 0.5], [7, 3, 3, 3]) == pytest.approx(0.35)


# --------------------------------------------------------------------------------------- position bias


def test_an_always_a_judge_is_all_position_bias_and_symmetrises_to_exactly_half():
    forward, backward = np.ones(10), np.zeros(10)  # it prefers whichever output it is shown first
    assert position_bias_rate(forward, backward) == 1.0
    assert win_rate(symmetrised_preferences(forward, backward)) == 0.5
    lengths = np.full(10, 100.0)
    result = summary(judged_pairs(None, lengths, lengths, forward=forward, backward=backward), resamples=50)
    assert result["position_bias_rate"] == 1.0
    assert result["win_rate"] == 0.5 and result["win_rate_interval"] == [0.5, 0.5]
    assert result["hard_win_rate"] == 0.5 and result["tie_rate"] == 1.0


def test_a_consistent_judge_has_no_position_bias_and_ties_count_half():
    assert position_bias_rate([0.9, 0.2, 0.7, 0.5], [0.8, 0.1, 0.6, 0.5]) == 0.0
    # win -> tie and tie -> loss move half a verdict; win -> loss a whole one
    assert position_bias_rate([0.5, 0.5, 0.9], [1.0, 0.0, 0.3]) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    # swapping model and baseline (p -> 1 - p) leaves the rate unchanged
    forward, backward = np.array([0.5, 0.6, 0.9, 0.1]), np.array([0.0, 0.5, 0.2, 0.4])
    assert position_bias_rate(1 - forward, 1 - backward) == position_bias_rate(forward, backward)


# ------------------------------------------------------------------------------------ length control


def test_lc_equals_the_raw_win_rate_when_lengths_do_not_differ():
    data = random_pairs(seed=1)
    same = data["model_lengths"]
    prompts = np.arange(200) // 2  # two pairs per prompt
    raw = win_rate(data["preferences"], prompts)
    assert length_controlled_win_rate(data["preferences"], same, same, prompts) == pytest.approx(
        raw, abs=1e-12
    )
    with_difficulty = length_controlled_win_rate(
        data["preferences"], same, same, prompts, data["difficulties"]
    )
    assert with_difficulty == pytest.approx(raw, abs=1e-12)
    # a constant difference (the model always 10 characters longer) has std 0 too: no length term
    fit = fit_length_glm(data["preferences"], same + 10, same, prompts)
    assert fit.length_std == 0.0 and fit.lc_win_rate == pytest.approx(raw, abs=1e-12)
    # all wins is separable: the unpenalised fit goes to its limit, LC 1
    all_wins = length_controlled_win_rate(np.ones(200), same, data["baseline_lengths"])
    assert all_wins == pytest.approx(1.0, abs=1e-9)
    # AlpacaEval's L1 penalty also shrinks the model's coefficient, pulling LC toward 0.5: not raw any more
    penalised = length_controlled_win_rate(data["preferences"], same, same, prompts, l1_penalty=10.0)
    assert abs(penalised - 0.5) < abs(raw - 0.5) - 0.01


def test_lc_removes_a_pure_length_preference():
    rng = np.random.default_rng(2)
    num_prompts = 300
    baseline_lengths = rng.integers(700, 1200, num_prompts).astype(float)
    longer = rng.random(num_prompts) < 0.8  # the model is usually the longer one
    model_lengths = baseline_lengths + np.where(longer, 1, -1) * rng.integers(50, 600, num_prompts)
    difference = model_lengths - baseline_lengths
    # the judge likes length and nothing else: logit = 2 tanh(difference / std), the model's own term 0
    preferences = sigmoid(2.0 * np.tanh(difference / np.std(difference, ddof=1)))
    raw = win_rate(preferences)
    assert raw > 0.65
    # the maximum-likelihood fit finds the judge's own coefficients exactly
    exact = fit_length_glm(preferences, model_lengths, baseline_lengths, length_ridge=0.0)
    assert exact.lc_win_rate == pytest.approx(0.5, abs=1e-9)
    assert exact.length_coef == pytest.approx(2.0, abs=1e-8)
    assert exact.model_coef == pytest.approx(0.0, abs=1e-8)
    # the default ridge shrinks the length coefficient a little (2 -> 1.987) and the model's term, which the
    # 80% longer outputs tie to it, takes up the rest: LC 0.5013, still far from the raw 0.65+
    fit = fit_length_glm(preferences, model_lengths, baseline_lengths)
    assert fit.lc_win_rate == pytest.approx(0.5, abs=2e-3)
    assert fit.length_coef == pytest.approx(2.0, abs=0.02) and fit.model_coef == pytest.approx(0.0, abs=0.01)


def test_swapping_model_and_baseline_gives_one_minus_every_rate():
    data = random_pairs(seed=3)
    prompts = np.arange(200) // 4
    p, model, baseline, difficulty = (
        data[k] for k in ("preferences", "model_lengths", "baseline_lengths", "difficulties")
    )
    assert win_rate(1 - p, prompts) == pytest.approx(1 - win_rate(p, prompts), abs=1e-12)
    assert hard_win_rate(1 - p, prompts) == pytest.approx(1 - hard_win_rate(p, prompts), abs=1e-12)
    for difficulties in (None, difficulty):
        forwards = length_controlled_win_rate(p, model, baseline, prompts, difficulties)
        swapped = length_controlled_win_rate(1 - p, baseline, model, prompts, difficulties)
        assert swapped == pytest.approx(1 - forwards, abs=1e-9)
        assert abs(forwards - win_rate(p, prompts)) > 1e-4  # the lengths did matter here


def separated_by_length(equal_length_pairs: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """16 prompts, one pair each, hard verdicts (a rule judge) that the length difference separates:
    (preferences, model_lengths, baseline_lengths)."""
    baseline_lengths = np.full(16, 1000.0)
    if equal_length_pairs:
        # longer: all 6 lost; shorter: all 4 won; 6 of equal length: 2 wins, a tie, 3 losses (5 / 12)
        differences = np.array([150, 300, 80, 500, 220, 60, -120, -400, -90, -250, 0, 0, 0, 0, 0, 0.0])
        preferences = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0.5, 0, 0, 0.0])
    else:
        # shaped like the real run: the policy mostly shorter, winning only when much shorter; raw 6.5 / 16
        differences = np.array(
            [-400, -350, -300, -280, -250, -200, -150, -120, -100, -80, -60, -40, -20, 30, 60, 90.0]
        )
        preferences = np.array([1, 1, 1, 1, 1, 1, 0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0.0])
    return preferences, baseline_lengths + differences, baseline_lengths


def test_lc_stays_finite_and_inside_0_1_when_lengths_separate_wins_from_losses():
    preferences, model_lengths, baseline_lengths = separated_by_length(equal_length_pairs=True)
    assert win_rate(preferences) == pytest.approx(6.5 / 16)
    fit = fit_length_glm(preferences, model_lengths, baseline_lengths)
    # unpenalised the length coefficient runs off (-93 where the fit stops) and resampled intervals reach 0;
    # the ridge holds it at -4.1 while the length pairs are still explained by length, so LC is what the
    # equal-length pairs say: 0.415 against their raw 5 / 12 = 0.417
    assert -10.0 < fit.length_coef < -1.0
    assert fit.lc_win_rate == pytest.approx(5 / 12, abs=0.01)
    # the model's term is tied to the raw rate: |logit(LC) - logit(raw)| <= |length_coef| (see the docs)
    raw_logit = np.log(6.5 / 9.5)
    assert abs(fit.model_coef - raw_logit) <= abs(fit.length_coef)
    estimate = bootstrap_interval(judged_pairs(preferences, model_lengths, baseline_lengths), "lc_win_rate")
    assert estimate.value == fit.lc_win_rate
    assert 0.1 < estimate.low < estimate.value < estimate.high < 0.9  # measured (0.155, 0.677)


def test_lc_is_not_driven_to_0_when_the_separating_length_is_not_0():
    # wins only where the policy is 200+ characters shorter: unpenalised, logit = theta * (tanh(d / s) - c)
    # separates, theta -> -inf drags the model's term to -inf with it: LC printed 0.000 (1e-87) at raw 0.406
    preferences, model_lengths, baseline_lengths = separated_by_length(equal_length_pairs=False)
    fit = fit_length_glm(preferences, model_lengths, baseline_lengths)
    # every pair within 120 characters of equal length was lost, so a low LC is what the data say: 0.021
    assert -10.0 < fit.length_coef < -1.0 and 0.01 < fit.lc_win_rate < 0.1
    assert abs(fit.model_coef - np.log(6.5 / 9.5)) <= abs(fit.length_coef)
    estimate = bootstrap_interval(judged_pairs(preferences, model_lengths, baseline_lengths), "lc_win_rate")
    assert 0.0 < estimate.low < estimate.value < estimate.high < 0.5  # measured (0.009, 0.078)


def test_the_length_ridge_is_negligible_on_hundreds_of_prompts():
    # AlpacaEval's scale, not separable: outputs 400 +- 500 characters longer, judge logit tanh(d / s) + 0.3,
    # hard verdicts with 10% ties, two pairs per prompt
    rng = np.random.default_rng(9)
    num_prompts = 500
    baseline_lengths = rng.integers(300, 2500, 2 * num_prompts).astype(float)
    model_lengths = np.maximum(baseline_lengths + rng.normal(400.0, 500.0, 2 * num_prompts), 1.0)
    difference = model_lengths - baseline_lengths
    win = sigmoid(np.tanh(difference / np.std(difference, ddof=1)) + 0.3)
    draw = rng.random(2 * num_prompts)
    preferences = np.where(draw < 0.9 * win, 1.0, np.where(draw < 0.9 * win + 0.1, 0.5, 0.0))
    prompts = np.arange(2 * num_prompts) // 2
    default = length_controlled_win_rate(preferences, model_lengths, baseline_lengths, prompts)
    unpenalised = length_controlled_win_rate(
        preferences, model_lengths, baseline_lengths, prompts, length_ridge=0.0
    )
    assert 0.0 < abs(default - unpenalised) < 1e-3


# ----------------------------------------------------------------------------------------------- bootstrap


def test_the_95_percent_interval_covers_the_true_win_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(4)
    replicates, num_prompts = 600, 150
    lengths = np.full(num_prompts, 100.0)
    covered = 0
    for replicate in range(replicates):
        # each verdict: a win with probability 0.5, a tie 0.2, a loss 0.3: true win rate 0.5 + 0.2 / 2 = 0.6
        verdicts = rng.choice([1.0, 0.5, 0.0], size=num_prompts, p=[0.5, 0.2, 0.3])
        estimate = bootstrap_interval(
            judged_pairs(verdicts, lengths, lengths), "win_rate", 500, seed=replicate
        )
        covered += estimate.low <= 0.6 <= estimate.high
    assert 0.92 <= covered / replicates <= 0.975


def test_the_bootstrap_resamples_prompts_not_pairs():
    # 20 prompts of 10 identical pairs each, half all wins, half all losses: the spread is that of 20 draws
    preferences = np.repeat([1.0, 0.0] * 10, 10)
    lengths = np.full(200, 100.0)
    pairs = judged_pairs(preferences, lengths, lengths, np.repeat(np.arange(20), 10))
    estimate = bootstrap_interval(pairs, "win_rate", 1000)
    # prompts: sd sqrt(0.25 / 20) = 0.11, width ~0.43; resampling the 200 pairs would give ~0.14
    assert estimate.value == 0.5 and estimate.high - estimate.low > 0.3
    assert bootstrap_interval(pairs, "win_rate", 1000, seed=1) != estimate  # the seed is used
    assert bootstrap_interval(pairs, "win_rate", 1000) == estimate  # and reproducible


def test_paired_difference_of_identical_systems_is_exactly_zero():
    data = random_pairs(seed=5)
    pairs = judged_pairs(
        data["preferences"], data["model_lengths"], data["baseline_lengths"], np.arange(200) // 2
    )
    for statistic in ("win_rate", "hard_win_rate", "lc_win_rate"):
        assert paired_bootstrap_interval(pairs, pairs, statistic, 200) == (0.0, 0.0, 0.0)
    # the same judgements listed in another order, prompts matched by id
    order = np.random.default_rng(0).permutation(200)
    shuffled = judged_pairs(
        data["preferences"][order],
        data["model_lengths"][order],
        data["baseline_lengths"][order],
        (np.arange(200) // 2)[order],
    )
    estimate = paired_bootstrap_interval(pairs, shuffled, "win_rate", 200)
    assert max(map(abs, estimate)) < 1e-12


def test_paired_interval_covers_a_known_shift():
    rng = np.random.default_rng(6)
    replicates, num_prompts = 400, 200
    lengths = np.full(num_prompts, 100.0)
    covered = 0
    for replicate in range(replicates):
        # two rounds judged on the same prompts, correlated through prompt difficulty and a shared draw
        difficulty = rng.uniform(0.2, 0.8, num_prompts)
        shared = rng.random(num_prompts)
        fresh = np.where(rng.random(num_prompts) < 0.5, shared, rng.random(num_prompts))
        first = (shared < difficulty).astype(float)
        second = (fresh < difficulty + 0.1).astype(float)  # true difference 0.1
        estimate = paired_bootstrap_interval(
            judged_pairs(second, lengths, lengths),
            judged_pairs(first, lengths, lengths),
            "win_rate",
            500,
            seed=replicate,
        )
        covered += estimate.low <= 0.1 <= estimate.high
    # resampling the two sides independently would ignore the correlation and cover nearly always
    assert 0.92 <= covered / replicates <= 0.975


def test_summary_is_plain_json_and_agrees_with_the_functions():
    data = random_pairs(seed=7, num_prompts=300)
    prompts = np.arange(300) // 3
    forward = data["preferences"]
    backward = np.clip(forward + np.random.default_rng(0).normal(0, 0.3, 300), 0, 1)
    pairs = judged_pairs(
        None, data["model_lengths"], data["baseline_lengths"], prompts, forward=forward, backward=backward
    )
    result = summary(pairs, resamples=300, seed=3)
    json.dumps(result, allow_nan=False)
    preferences = symmetrised_preferences(forward, backward)
    assert result["win_rate"] == pytest.approx(win_rate(preferences, prompts))
    assert result["hard_win_rate"] == pytest.approx(hard_win_rate(preferences, prompts))
    assert result["tie_rate"] == pytest.approx(tie_rate(preferences, prompts))
    assert result["lc_win_rate"] == pytest.approx(
        length_controlled_win_rate(preferences, data["model_lengths"], data["baseline_lengths"], prompts)
    )
    assert result["position_bias_rate"] == pytest.approx(position_bias_rate(forward, backward, prompts))
    for name in ("win_rate", "hard_win_rate", "lc_win_rate"):
        low, high = result[f"{name}_interval"]
        assert low < result[name] < high
        assert bootstrap_interval(pairs, name, 300, seed=3)[1:] == (low, high)  # the same draws
    assert (result["num_prompts"], result["num_pairs"]) == (100, 300)
    assert result["mean_model_length"] == pytest.approx(
        data["model_lengths"].mean()
    )  # 3 pairs in every prompt
    assert result["mean_baseline_length"] == pytest.approx(data["baseline_lengths"].mean())
    no_orders = judged_pairs(preferences, data["model_lengths"], data["baseline_lengths"], prompts)
    assert summary(no_orders, resamples=10)["position_bias_rate"] is None


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: win_rate([0.2, 1.2]), r"preferences must lie in \[0, 1\].*row 1 is 1.2"),
        (
            lambda: win_rate([0.2, float("nan")]),
            r"preferences must be finite numbers \(no NaN or inf\); row 1",
        ),
        (lambda: win_rate([]), "no pairs: preferences is empty"),
        (lambda: win_rate(["x"]), "preferences must be numbers"),
        (lambda: win_rate([0.5, 0.5], prompts=["a"]), "prompts has 1 rows but preferences has 2"),
        (
            lambda: judged_pairs([0.5, 0.5], [1, 2, 3], [1, 2]),
            "model_lengths has 3 rows but preferences has 2",
        ),
        (lambda: judged_pairs([0.5], [1], [-1]), r"baseline_lengths must be lengths in characters \(>= 0\)"),
        (lambda: position_bias_rate([1, 0], [0]), "backward has 1 rows but forward has 2"),
        (lambda: judged_pairs(None, [1], [1], forward=[1.0]), "needs both forward and backward"),
        (lambda: judged_pairs(None, [1], [1]), "no preferences"),
        (
            lambda: bootstrap_interval(judged_pairs([0.5], [1], [1]), "position_bias_rate"),
            "needs forward and backward",
        ),
        (
            lambda: bootstrap_interval(judged_pairs([0.5], [1], [1]), "accuracy"),
            "unknown statistic 'accuracy'",
        ),
        (
            lambda: bootstrap_interval(judged_pairs([0.5], [1], [1]), level=95),
            "level must lie strictly between 0 and 1",
        ),
        (
            lambda: paired_bootstrap_interval(
                judged_pairs([0.5, 1], [1, 1], [1, 1], ["a", "b"]),
                judged_pairs([0.5, 1], [1, 1], [1, 1], ["a", "c"]),
            ),
            "same prompts on both sides: 1 prompts only in the first, 1 only in the second",
        ),
        (lambda: fit_length_glm([0.5], [1], [1], l1_penalty=-1), "l1_penalty must be >= 0"),
        (lambda: fit_length_glm([0.5], [1], [1], length_ridge=-1), "length_ridge must be >= 0"),
    ],
)
def test_bad_input_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------- alpaca_eval reference


# alpaca_eval's fits of the test's annotations, as alpaca_eval 0.6.6 computed them. alpaca-eval is not in the
# test install (it pulls in scikit-learn, which transformers then imports in every process: ~0.9 s a start);
# with it installed (pip install alpaca-eval) the test fits them anew and checks them against this file too.
ALPACA_EVAL_FITS = Path(__file__).parent / "data" / "alpaca_eval_lc.json"
NUM_PROMPTS = 200
EXACT = dict(n_splits=0, tol=1e-12, max_iter=100_000)  # one liblinear fit at a fixed C, solved tightly


def alpaca_eval_fits(tmp_path, monkeypatch, data: dict) -> dict:
    """alpaca_eval's get_length_controlled_winrate on the test's annotations, with the test's difficulties: the LC
    win rate (a fraction) and the GLM's coefficients at C = 1e8, 1 and 0.1 (length_controlled_noreg), at C = 1e8
    without difficulties (length_controlled_minimal), and alpaca_eval's default (C by 5-fold cross-validation,
    then refitted) with the C it chose."""
    import pandas as pd
    import sklearn
    from alpaca_eval.metrics import glm_winrate

    p, model, baseline, difficulty = (
        data[k] for k in ("preferences", "model_lengths", "baseline_lengths", "difficulties")
    )
    # where alpaca_eval looks the per-instruction difficulties up (df_gamed.csv on the hub): our own file
    pd.DataFrame(
        {"model": "none", "index": np.arange(NUM_PROMPTS), "instruction_difficulty": difficulty}
    ).to_csv(tmp_path / "df_gamed.csv", index=False)
    monkeypatch.setattr(glm_winrate, "hf_hub_download", lambda **kwargs: str(tmp_path / "df_gamed.csv"))
    # alpaca_eval's shape: output_1 / generator_1 the baseline, output_2 the model, preference in [1, 2]
    annotations = pd.DataFrame(
        {
            "instruction": [f"instruction {i}" for i in range(NUM_PROMPTS)],
            "output_1": ["b" * int(n) for n in baseline],
            "output_2": ["m" * int(n) for n in model],
            "generator_1": "baseline",
            "generator_2": "model",
            "preference": 1.0 + p,
        }
    )

    def fit(formula_name: str, **kwargs) -> list:
        """[LC win rate as a fraction, the GLM's coefficients] from alpaca_eval."""
        glm_info = {
            "formula": glm_winrate.GLM_INFO[formula_name]["formula"],
            "regularize_to_baseline_lambda": None,
            "kwargs": kwargs,
        }
        weights_dir = tmp_path / f"weights_{len(list(tmp_path.iterdir()))}"
        with sklearn.config_context(), warnings.catch_warnings():  # it turns on sklearn's metadata routing
            warnings.simplefilter("ignore")
            metrics = glm_winrate.get_length_controlled_winrate(
                annotations.copy(),
                glm_info=glm_info,
                save_weights_dir=weights_dir,
                is_warn_extreme_changes=False,
            )
        coefs = pd.read_csv(weights_dir / "length_controlled_v1" / "baseline_baseline.csv", index_col=0)
        return [metrics["length_controlled_winrate"] / 100, coefs.loc["model"].dropna().tolist()]

    chosen = []

    def fit_and_keep_c(*args, **kwargs):
        fitted = original_fit(*args, **kwargs)
        chosen.append(float(np.ravel(fitted.C_)[0]))
        return fitted

    fits = {f"noreg C={C:g}": fit("length_controlled_noreg", C=C, **EXACT) for C in (1e8, 1.0, 0.1)}
    fits["minimal C=1e+08"] = fit("length_controlled_minimal", C=1e8, **EXACT)
    original_fit = glm_winrate.fit_LogisticRegressionCV
    monkeypatch.setattr(glm_winrate, "fit_LogisticRegressionCV", fit_and_keep_c)
    default, _ = fit("length_controlled_noreg", **glm_winrate.GLM_INFO["length_controlled_noreg"]["kwargs"])
    fits["default"] = [default, chosen[0]]
    return fits


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_lc_win_rate_matches_alpaca_eval(tmp_path, monkeypatch):
    """prefrun's length-controlled fit equals alpaca_eval's own on the same annotations."""
    data = random_pairs(seed=8, num_prompts=NUM_PROMPTS)
    p, model, baseline, difficulty = (
        data[k] for k in ("preferences", "model_lengths", "baseline_lengths", "difficulties")
    )
    stored = json.loads(ALPACA_EVAL_FITS.read_text())["fits"]
    if importlib.util.find_spec("alpaca_eval") is not None:
        live = alpaca_eval_fits(tmp_path, monkeypatch, data)
        flat = lambda fits: [x for k in sorted(fits) for x in np.hstack(fits[k]).tolist()]  # noqa: E731
        assert sorted(live) == sorted(stored)
        assert flat(live) == pytest.approx(flat(stored), abs=1e-7), "alpaca_eval fits otherwise than the stored file"
    no_ridge = dict(length_ridge=0.0)  # alpaca_eval's fit is L1 only: prefrun's default ridge off
    # with difficulties: C = 1e8 is the unpenalised fit; C = 1 shrinks every coefficient; C = 0.1 zeroes two
    for C, l1_penalty in ((1e8, 0.0), (1.0, 1.0), (0.1, 10.0)):
        expected, (length_coef, difficulty_coef, model_coef) = stored[f"noreg C={C:g}"]
        fit = fit_length_glm(p, model, baseline, difficulties=difficulty, l1_penalty=l1_penalty, **no_ridge)
        assert fit.lc_win_rate == pytest.approx(expected, abs=1e-7)
        # alpaca_eval's length difference is baseline - model: the coefficient's sign is the other way
        assert (-fit.length_coef, fit.difficulty_coef, fit.model_coef) == pytest.approx(
            (length_coef, difficulty_coef, model_coef), abs=1e-6
        )
    # without difficulties: alpaca_eval's length_controlled_minimal formula
    expected, (length_coef, model_coef) = stored["minimal C=1e+08"]
    fit = fit_length_glm(p, model, baseline, **no_ridge)
    assert fit.lc_win_rate == pytest.approx(expected, abs=1e-7)
    assert (-fit.length_coef, fit.model_coef) == pytest.approx((length_coef, model_coef), abs=1e-6)
    # alpaca_eval's default picks C by 5-fold cross-validation (10 values from 1e-4 to 1e4), then refits:
    # the same fit as prefrun's at l1_penalty = 1 / C, to about liblinear's default tolerance
    default, chosen = stored["default"]
    unpenalised = length_controlled_win_rate(p, model, baseline, difficulties=difficulty, **no_ridge)
    penalised = length_controlled_win_rate(
        p, model, baseline, difficulties=difficulty, l1_penalty=1 / chosen, **no_ridge
    )
    assert penalised == pytest.approx(default, abs=1e-5)
    assert abs(unpenalised - default) > 1e-3  # the penalty it picks does move the figure here
