"""The exact testbed: claims (a), (b) and (d) on small bandits, the pure tensor functions it shares with the
LLM path (samplers, APO extrapolation) against values worked out by hand, and `prefrun testbed` end to end."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy.stats import chisquare
from torch import Tensor

from prefrun import testbed as tb
from prefrun.cli import config_dir
from prefrun.errors import InputError
from prefrun.extrapolate import extrapolate_logprobs, extrapolate_parameters
from prefrun.losses import dpo_loss
from prefrun.samplers import (
    CDSampler,
    DatasetSampler,
    HardestSampler,
    RandomSampler,
    RewardSampler,
    bias_warning,
    cd_negatives,
    effective_sample_size,
    hardest_negatives,
    random_negatives,
)

from .conftest import run_cli

BETA = 0.5


@pytest.fixture(autouse=True)
def one_thread():
    """The testbed's tensors are tiny; several threads only add start-up cost (as `prefrun testbed` does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_bandit(seed: int = 1, **overrides) -> tb.Bandit:
    sizes = dict(num_prompts=6, num_responses=5, num_features=2, reward_scale=1.0, feature_share=0.5,
                 reference_scale=1.0)
    return tb.make_bandit(**{**sizes, **overrides}, seed=seed)


def dpo(beta: float = BETA):
    return functools.partial(dpo_loss, beta=beta)


# (a) -------------------------------------------------------------------------------------------------------


def test_rlhf_optimum_is_pi_star_star():
    """The target itself: minimising the RLHF objective over a tabular policy gives π_ref·exp(r*/β)/Z."""
    bandit = small_bandit()
    policy = tb.TabularPolicy(bandit.reference_logps)
    tb.minimise(policy, lambda lp: tb.rlhf_objective(bandit, lp, BETA), max_iter=500)
    kl = tb.expected_kl(bandit.optimal_logps(BETA), policy().detach(), bandit.prompt_weights)
    assert kl < 1e-10


def test_a_unconstrained_dpo_converges_to_pi_star_star():
    bandit = small_bandit()
    result = tb.dpo_optimum(bandit, dpo(), beta=BETA, sample_sizes=[2_000, 200_000], max_iter=500, seed=0)
    assert result["kl_reference"] > 0.1  # the check is not vacuous
    assert result["kl_population"] < 1e-4
    assert result["kl_population"] < 1e-10  # in fact it is exact up to the optimiser's tolerance
    small, large = result["sampled"]
    assert large["degenerate_prompts"] == 0 and large["kl"] < small["kl"] and large["kl"] < 1e-3


def test_population_loss_weights_are_a_distribution_with_bradley_terry_labels():
    bandit = small_bandit()
    weights = tb.preference_weights(bandit, bandit.reference_logps)
    assert weights.sum().item() == pytest.approx(1.0)
    assert torch.diagonal(weights, dim1=1, dim2=2).abs().max() == 0  # ties are dropped
    # P(i beats j) / P(j beats i) = exp(r*_i − r*_j) for every pair
    ratio = weights / weights.transpose(1, 2)
    off_diagonal = ~torch.eye(5, dtype=torch.bool).expand_as(ratio)
    expected = (bandit.reward[:, :, None] - bandit.reward[:, None, :]).exp()
    torch.testing.assert_close(ratio[off_diagonal], expected[off_diagonal])


def test_degenerate_prompts_by_hand():
    weights = torch.zeros(2, 3, 3, dtype=torch.float64)
    weights[0, 0, 1] = weights[0, 1, 2] = weights[0, 2, 0] = 1  # a cycle: every response both wins and loses
    weights[1, 0, 1] = weights[1, 1, 2] = weights[1, 0, 2] = 1  # response 0 never loses: no minimiser
    assert tb.degenerate_prompts(weights) == 1


# (b) -------------------------------------------------------------------------------------------------------


def proposition(**overrides) -> tb.Bandit:
    return tb.proposition_bandit(**{**dict(num_prompts=12, num_features=2, reward_scale=3.0, feature_share=0.5,
                                           seed=0), **overrides})


def test_b_dpo_is_forward_kl_and_rlhf_is_reverse_kl_up_to_constants():
    """Eqs. 20 and 22 of paper 001 at arbitrary policies, not only at the minimisers."""
    bandit = proposition()
    target = bandit.optimal_logps(1.0)
    dpo_objective = tb.preference_loss(dpo(1.0), bandit.reference_logps,
                                       tb.preference_weights(bandit, bandit.reference_logps))
    generator = torch.Generator().manual_seed(0)
    dpo_offsets, rlhf_offsets = [], []
    for _ in range(5):
        logps = torch.log_softmax(3 * torch.randn(12, 2, generator=generator, dtype=torch.float64), -1)
        dpo_offsets.append(float(dpo_objective(logps) - tb.expected_kl(target, logps, bandit.prompt_weights)))
        rlhf_offsets.append(float(tb.rlhf_objective(bandit, logps, 1.0) - tb.expected_kl(logps, target, bandit.prompt_weights)))
    assert max(dpo_offsets) - min(dpo_offsets) < 1e-12
    assert max(rlhf_offsets) - min(rlhf_offsets) < 1e-12


def test_b_constrained_minimisers_match_their_kl_and_differ_from_each_other():
    result = tb.constrained_dpo(proposition(), gradient_steps=10, lr=0.5, weight_decay=0.1, max_iter=500)
    rows = {row["constraint"].split(",")[0] + (" steps" if "steps" in row["constraint"] else ""): row
            for row in result["rows"]}
    assert set(rows) == {"linear-softmax", "tabular steps", "tabular", "none (tabular)"}
    for row in result["rows"]:
        assert row["tv_dpo_forward"] < 1e-6, row["constraint"]   # DPO minimiser = forward-KL minimiser
        assert row["tv_rlhf_reverse"] < 1e-6, row["constraint"]  # RLHF minimiser = reverse-KL minimiser
    for name in ("linear-softmax", "tabular steps", "tabular"):
        assert rows[name]["tv_dpo_rlhf"] > 1e-2, name  # under a constraint they differ
    assert rows["none (tabular)"]["tv_dpo_rlhf"] < 1e-6  # unconstrained they coincide (π*)
    linear = rows["linear-softmax"]  # a constraint set, minimised exactly: each is best on its own KL
    assert linear["forward_kl"]["DPO"] < linear["forward_kl"]["RLHF"]
    assert linear["reverse_kl"]["RLHF"] < linear["reverse_kl"]["DPO"]
    # mode covering (DPO) against mode seeking (RLHF)
    assert linear["entropy"]["DPO"] > linear["entropy"]["RLHF"]
    assert linear["under_coverage"]["DPO"] > linear["under_coverage"]["RLHF"]


def test_b_needs_the_propositions_setting():
    with pytest.raises(InputError, match="two responses"):
        tb.constrained_dpo(small_bandit(), gradient_steps=1, lr=0.1, weight_decay=0.1, max_iter=10)


# (d) -------------------------------------------------------------------------------------------------------


def test_d_alpha_zero_with_exact_proximal_steps_is_iterative_dpo():
    """Each round's DPO minimiser (reference π_t, pairs from π_t) is the proximal step π_t·exp(r*/β)/Z, so
    α = 0 gives iterative DPO in closed form: π̂_t ∝ π_ref·exp(t·r*/β)."""
    bandit = small_bandit()
    result = tb.apo_rounds(bandit, tb.TabularPolicy(bandit.reference_logps), dpo(), alpha=0.0, rounds=4, max_iter=50)
    for t, fitted in enumerate(result["hat_logps"]):
        iterative = torch.log_softmax(bandit.reference_logps + t * bandit.reward / BETA, -1)
        assert tb.expected_kl(iterative, fitted, bandit.prompt_weights) < 1e-12, t


@pytest.mark.parametrize("alpha", [0.3, 0.7])
def test_d_apo_follows_the_closed_form_and_is_never_slower(alpha):
    bandit = small_bandit()
    rounds = 5
    result = tb.apo_rounds(bandit, tb.TabularPolicy(bandit.reference_logps), dpo(), alpha=alpha, rounds=rounds,
                           max_iter=50)
    closed_form = tb.proximal_logps(bandit, BETA, alpha, rounds)
    steps = tb.effective_steps(alpha, rounds)
    for t, (fitted, exact) in enumerate(zip(result["hat_logps"], closed_form)):
        assert tb.expected_kl(exact, fitted, bandit.prompt_weights) < 1e-12, t
        # π̂_t ∝ π_ref·exp(c_t·r*/β): APO is iterative DPO with a step that grows to 1/(1 − α)
        expected = torch.log_softmax(bandit.reference_logps + steps[t] * bandit.reward / BETA, -1)
        torch.testing.assert_close(exact, expected)
    assert steps[-1] - steps[-2] == pytest.approx((1 - alpha**rounds) / (1 - alpha))
    apo_gaps = [tb.suboptimality(bandit, lp) for lp in result["hat_logps"]]
    dpo_gaps = [tb.suboptimality(bandit, lp) for lp in tb.proximal_logps(bandit, BETA, 0.0, rounds)]
    assert apo_gaps[1] == pytest.approx(dpo_gaps[1])  # round 1 is shared
    assert all(a < d for a, d in zip(apo_gaps[2:], dpo_gaps[2:]))  # then APO is strictly ahead
    assert all(a > b for a, b in zip(apo_gaps, apo_gaps[1:]))  # and improves every round


def test_d_apo_reaches_the_target_in_no_more_rounds():
    result = tb.apo(small_bandit(), dpo(), beta=BETA, alphas=[0.0, 0.5], rounds=6, target_suboptimality=0.05,
                    mlp_hidden=4, max_iter=30, seed=0)
    tabular = {run["alpha"]: run for run in result["runs"] if run["policy"] == "tabular"}
    assert tabular[0.0]["rounds_to_target"] is not None
    assert tabular[0.5]["rounds_to_target"] <= tabular[0.0]["rounds_to_target"]
    assert max(tabular[0.5]["closed_form_kl"]) < 1e-12


def test_d_parameter_space_extrapolation_is_exact_only_for_log_linear_policies():
    bandit = small_bandit()
    linear = tb.apo_rounds(bandit, tb.LinearSoftmaxPolicy(bandit.reference_logps, bandit.features), dpo(),
                           alpha=0.5, rounds=3, max_iter=100)
    assert max(linear["extrapolation_gap"]) < 1e-12
    mlp = tb.apo_rounds(bandit, tb.MLPPolicy(bandit.reference_logps, bandit.features, 8, seed=0), dpo(),
                        alpha=0.5, rounds=3, max_iter=100)
    assert max(mlp["extrapolation_gap"]) > 1e-6


# (e) -------------------------------------------------------------------------------------------------------


def test_e_normaliser_bias_shrinks_with_m_and_has_the_expected_signs():
    result = tb.normaliser_estimates(small_bandit(), num_negatives=[1, 16], repeats=4000, seed=0)
    one, sixteen = result["rows"]
    assert one["plain"]["bias"] < sixteen["plain"]["bias"] < 0  # Jensen: log of an unbiased estimate is too small
    assert one["loss"]["bias"] > sixteen["loss"]["bias"] > 0  # y_w ~ p* inside the normaliser: too large
    assert sixteen["plain"]["variance"] < one["plain"]["variance"] / 8


def fixed_point_ratio(variant: tb.McpoVariant, *, pool_size: int, num_pools: int, seed: int = 1) -> float:
    """‖mean gradient at π**‖ / noise level on a small bandit (≈ 1 at a fixed point, ≫ 1 where biased)."""
    bandit = small_bandit(seed)
    check = tb.gradient_at(bandit, bandit.optimal_logps(BETA), variant, beta=BETA, pool_size=pool_size,
                           num_pools=num_pools, seed=0)
    return check["norm"] / check["noise"]


@pytest.mark.parametrize("seed", [1, 2])
def test_e_mcpo_cd_with_cd_keeps_pi_star_star_and_log_softmax_with_cd_does_not(seed):
    """The consistent pairing (draws with replacement, y_w included, τ = 1) against the paper's reading of the
    log-softmax form (CD negatives from the pool less y_w): the second is biased, by far."""
    consistent = tb.McpoVariant("mcpo_cd", CDSampler(num_negatives=2), "")
    paper = tb.McpoVariant("mcpo", CDSampler(num_negatives=2, replacement=False, include_chosen=False), "")
    assert fixed_point_ratio(consistent, pool_size=5, num_pools=4096, seed=seed) < 1.5
    assert fixed_point_ratio(paper, pool_size=5, num_pools=4096, seed=seed) > 10
    # τ ≠ 1 is biased at π**, but keeps π_ref·exp(τ·r*/β)/Z: τ acts as β/τ
    tempered = tb.McpoVariant("mcpo_cd", CDSampler(num_negatives=2, temperature=0.5), "")
    assert fixed_point_ratio(tempered, pool_size=5, num_pools=4096, seed=seed) > 10
    bandit = small_bandit(seed)
    shifted = torch.log_softmax(bandit.reference_logps + 0.5 * bandit.reward / BETA, -1)
    check = tb.gradient_at(bandit, shifted, tempered, beta=BETA, pool_size=5, num_pools=4096, seed=0)
    assert check["norm"] < 1.5 * check["noise"]


def test_e_log_softmax_needs_negatives_exchangeable_with_the_winner():
    """Uniform draws keep π** for `mcpo` when they are exchangeable with y_w: without replacement from the pool less
    y_w, or with replacement from the whole pool. The two mixed switches are biased (small pools show it clearly)."""
    def ratio(replacement: bool, include_chosen: bool) -> float:
        sampler = RandomSampler(num_negatives=2, replacement=replacement, include_chosen=include_chosen)
        return fixed_point_ratio(tb.McpoVariant("mcpo", sampler, ""), pool_size=4, num_pools=8192)

    assert ratio(False, False) < 1.5 and ratio(True, True) < 1.5
    assert ratio(True, False) > 5 and ratio(False, True) > 5
    whole_pool = tb.McpoVariant("mcpo", DatasetSampler(), "")  # winners in closed form: exactly zero
    bandit = small_bandit()
    check = tb.gradient_at(bandit, bandit.optimal_logps(BETA), whole_pool, beta=BETA, pool_size=5, num_pools=256, seed=0)
    assert check["norm"] < tb.ROUNDING and tb.is_fixed_point(check)


# What docs/testbed.md, section e, measures as keeping π** (K = 8, M = 2; verdicts identical for seeds 0 and 1).
MEASURED_CONSISTENT = {"mcpo × random (without replacement, y_w out)", "mcpo × random (with replacement, y_w in)",
                       "mcpo × dataset (whole pool, M = K − 1)", "mcpo_cd × cd (with replacement, y_w in)"}


def test_e_variants_cover_every_sampler_and_bias_warning_follows_the_measurements():
    variants = tb.mcpo_variants(2, [1.0, 0.5])
    for loss in ("mcpo", "mcpo_cd"):
        assert {v.name for v in variants if v.loss == loss} == {"cd", "random", "hardest", "reward", "dataset"}
    assert len({v.label for v in variants}) == len(variants)
    assert MEASURED_CONSISTENT <= {v.label for v in variants}
    for v in variants:
        warning = bias_warning(f"{v.loss}_loss", v.sampler)
        assert (warning is None) == (v.label in MEASURED_CONSISTENT), v.label
    warning = bias_warning("mcpo_loss", CDSampler(replacement=False, include_chosen=False))
    assert "loss=mcpo with sampler=cd (temperature=1.0, replacement=False" in warning and "sampler=random" in warning
    assert "sampler=dataset does not keep" in bias_warning("mcpo_cd_loss", DatasetSampler())
    for sampler in (CDSampler(), RandomSampler(), HardestSampler(), RewardSampler(), DatasetSampler()):
        assert bias_warning("dpo_loss", sampler) is None  # pair losses are not MC-PO's business


def test_e_batch_loss_columns_are_the_chosen_then_the_draws():
    bandit = small_bandit()
    prompt, pools = tb.make_pools(bandit, pool_size=5, num_pools=50, generator=torch.Generator().manual_seed(0))
    assert pools.shape == (300, 5) and (prompt == torch.arange(6).repeat_interleave(50)).all()
    for variant, width in ((tb.McpoVariant("mcpo", HardestSampler(num_negatives=2), ""), 3),
                           (tb.McpoVariant("mcpo_cd", CDSampler(num_negatives=3), ""), 4),
                           (tb.McpoVariant("mcpo", DatasetSampler(), ""), 5)):
        loss, columns = tb.mcpo_batch_loss(bandit.reference_logps, bandit.reference_logps, bandit.reward, prompt, pools,
                                           variant, beta=BETA, generator=torch.Generator().manual_seed(0))
        assert columns.shape == (300, width) and (columns[:, 0] == 0).all() and torch.isfinite(loss)
    # distinct sequences per row: repeats and y_w itself count once
    assert tb.distinct_columns(torch.tensor([[0, 0, 0], [0, 2, 2], [0, 1, 3], [0, 3, 0]])).tolist() == [1, 2, 3, 2]


def test_e_chosen_first_keeps_each_pool_and_moves_the_chosen_one_to_column_0():
    candidates = torch.tensor([[7, 8, 9, 10], [7, 8, 9, 10], [7, 8, 9, 10]])
    moved = tb._chosen_first(candidates, torch.tensor([0, 2, 3]))
    assert moved.tolist() == [[7, 8, 9, 10], [9, 8, 7, 10], [10, 8, 9, 7]]


# The pure functions ----------------------------------------------------------------------------------------


def test_cd_negatives_never_return_the_chosen_one_nor_duplicates():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(500, 7, generator=generator)
    chosen = torch.randint(7, (500,), generator=generator)
    for sample in (functools.partial(cd_negatives, temperature=0.5), random_negatives, hardest_negatives):
        negatives = sample(scores, chosen, 4, generator=generator)
        assert negatives.shape == (500, 4)
        assert not (negatives == chosen[:, None]).any()
        assert all(len(set(row)) == 4 for row in negatives.tolist())


P_VALUE = 1e-3  # χ² goodness of fit at a fixed seed: deterministic, and a wrong law fails it by far


def chi2_p_value(draws: Tensor, expected: Tensor) -> float:
    """p-value of the χ² test that `draws` (category indices) follow the probabilities `expected`."""
    counts = torch.bincount(draws, minlength=len(expected)).double()
    assert counts[expected == 0].sum() == 0  # a category the law excludes never comes up
    keep = expected > 0
    return float(chisquare(counts[keep].numpy(), len(draws) * expected[keep].numpy()).pvalue)


def test_cd_with_replacement_draws_iid_from_the_softmax_over_the_whole_pool():
    """The mcpo_cd sampler: every draw ∝ softmax(score/τ) over the pool, y_w included, independently of the others."""
    rows, k, tau = 20_000, 5, 0.7
    scores = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]], dtype=torch.float64).expand(rows, k)
    p = torch.softmax(scores[0] / tau, 0)
    draws = cd_negatives(scores, torch.full((rows,), 2), 3, temperature=tau, replacement=True, include_chosen=True,
                         generator=torch.Generator().manual_seed(0))
    for position in range(3):
        assert chi2_p_value(draws[:, position], p) > P_VALUE, position
    # independence: the ordered pair (first, second) follows p_i·p_j over the K² cells
    assert chi2_p_value(draws[:, 0] * k + draws[:, 1], torch.outer(p, p).flatten()) > P_VALUE
    assert chi2_p_value(draws[:, 0], torch.full((k,), 1 / k, dtype=torch.float64)) < 1e-100  # the test has power


def test_cd_without_replacement_draws_sequentially_from_the_pool_less_the_chosen_one():
    """The paper's reading: the first draw ∝ softmax over the pool minus y_w, the second from what is left,
    P(first = i, second = j) = p_i·p_j/(1 − p_i)."""
    rows, k, tau = 20_000, 5, 0.7
    scores = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]], dtype=torch.float64).expand(rows, k)
    p = torch.softmax(scores[0].clone().index_fill_(0, torch.tensor([2]), float("-inf")) / tau, 0)  # p_2 = 0: y_w
    draws = cd_negatives(scores, torch.full((rows,), 2), 2, temperature=tau, generator=torch.Generator().manual_seed(0))
    assert chi2_p_value(draws[:, 0], p) > P_VALUE
    pairs = torch.outer(p, p) / (1 - p)[:, None]
    pairs.fill_diagonal_(0)
    assert pairs.sum().item() == pytest.approx(1.0)
    assert chi2_p_value(draws[:, 0] * k + draws[:, 1], pairs.flatten()) > P_VALUE
    # the second draw is not the softmax again: the sequential law is what is checked
    assert chi2_p_value(draws[:, 1], p) < P_VALUE


def test_random_negatives_are_uniform_over_present_candidates_with_either_switch():
    rows = 20_000
    scores = torch.tensor([[5.0, 0.0, float("-inf"), -5.0, 1.0]]).expand(rows, 5)
    chosen = torch.zeros(rows, dtype=torch.long)
    whole = random_negatives(scores, chosen, 2, replacement=True, include_chosen=True,
                             generator=torch.Generator().manual_seed(0))
    present = torch.tensor([0.25, 0.25, 0.0, 0.25, 0.25], dtype=torch.float64)
    assert chi2_p_value(whole.flatten(), present) > P_VALUE
    less_chosen = random_negatives(scores, chosen, 1, generator=torch.Generator().manual_seed(0))
    assert chi2_p_value(less_chosen[:, 0], torch.tensor([0, 1 / 3, 0, 1 / 3, 1 / 3], dtype=torch.float64)) > P_VALUE


def test_effective_sample_size_by_hand():
    weights = torch.tensor([[1.0, 1.0, 2.0]], dtype=torch.float64)  # normalised: ¼, ¼, ½ -> 1/(1/16 + 1/16 + 1/4)
    torch.testing.assert_close(effective_sample_size(weights.log()), torch.tensor([8 / 3], dtype=torch.float64))
    # τ = 2 takes the square root of the weights: (2 + √2)²/(1 + 1 + 2)
    torch.testing.assert_close(effective_sample_size(weights.log(), temperature=2.0),
                               torch.tensor([(2 + math.sqrt(2)) ** 2 / 4], dtype=torch.float64))
    scores = torch.tensor([[0.0, 0.0, float("-inf")], [0.0, 0.0, 0.0], [50.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(effective_sample_size(scores), torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64))


def test_cd_negatives_limits_are_hardest_and_random():
    scores = torch.tensor([[0.3, 2.0, -1.0, 1.5, 0.0], [1.0, -2.0, 0.5, 0.2, 3.0]])
    chosen = torch.tensor([1, 4])
    cold = cd_negatives(scores, chosen, 2, temperature=1e-6, generator=torch.Generator().manual_seed(0))
    assert cold.tolist() == hardest_negatives(scores, chosen, 2).tolist() == [[3, 0], [0, 2]]
    # random negatives ignore the scores but not a missing candidate (−inf)
    pool = torch.tensor([[5.0, 0.0, float("-inf"), -5.0]]).expand(40_000, 4)
    negatives = random_negatives(pool, torch.zeros(40_000, dtype=torch.long), 1, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(negatives[:, 0], minlength=4).double() / 40_000
    assert counts[0] == 0 and counts[2] == 0
    assert counts[1].item() == pytest.approx(0.5, abs=0.01) and counts[3].item() == pytest.approx(0.5, abs=0.01)


def test_samplers_refuse_more_negatives_than_the_pool_has():
    with pytest.raises(InputError, match="num_negatives=4"):
        cd_negatives(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 4)
    with pytest.raises(InputError, match="temperature"):
        cd_negatives(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 1, temperature=0.0)


def test_extrapolate_logprobs_by_hand():
    new, prev = torch.tensor([0.5, 0.25, 0.25]).log(), torch.tensor([0.25, 0.25, 0.5]).log()
    # α = 1: new²/prev = [1, 0.25, 0.125] -> normalised by 1.375
    expected = torch.tensor([1, 0.25, 0.125]) / 1.375
    torch.testing.assert_close(extrapolate_logprobs(new, prev, 1.0).exp(), expected)
    # α = 0.5: new^1.5/prev^0.5 = [0.5^1.5/0.5, 0.25, 0.25^1.5/0.5^0.5]
    unnormalised = torch.tensor([0.5**1.5 / 0.5, 0.25, 0.25**1.5 / 0.5**0.5])
    torch.testing.assert_close(extrapolate_logprobs(new, prev, 0.5).exp(), unnormalised / unnormalised.sum())
    torch.testing.assert_close(extrapolate_logprobs(new, prev, 0.0), new)  # α = 0: no extrapolation


def test_extrapolate_logprobs_is_normalised_over_the_last_dim():
    generator = torch.Generator().manual_seed(0)
    new = torch.log_softmax(torch.randn(3, 4, 6, generator=generator, dtype=torch.float64), -1)
    prev = torch.log_softmax(torch.randn(3, 4, 6, generator=generator, dtype=torch.float64), -1)
    for alpha in (0.1, 0.3, 0.7, 2.0):
        out = extrapolate_logprobs(new, prev, alpha)
        torch.testing.assert_close(torch.logsumexp(out, -1), torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(InputError, match="finite"):
        extrapolate_logprobs(torch.tensor([0.0, float("-inf")]), torch.tensor([-0.7, -0.7]), 0.3)


def test_extrapolate_parameters_by_hand():
    torch.testing.assert_close(extrapolate_parameters(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]), 0.5),
                               torch.tensor([1.5, 1.0]))
    new = {"w": torch.tensor([[1.0, -1.0]]), "steps": torch.tensor(7)}
    prev = {"w": torch.tensor([[3.0, -1.0]]), "steps": torch.tensor(6)}
    out = extrapolate_parameters(new, prev, 0.3)
    torch.testing.assert_close(out["w"], torch.tensor([[1.0 - 0.6, -1.0]]))
    assert out["steps"].item() == 7  # integer buffers are not extrapolated
    with pytest.raises(InputError, match="different parameters"):
        extrapolate_parameters({"w": torch.zeros(1)}, {"v": torch.zeros(1)}, 0.3)


def test_linear_softmax_parameter_extrapolation_equals_log_space_by_construction():
    bandit = small_bandit()
    policy = tb.LinearSoftmaxPolicy(bandit.reference_logps, bandit.features)
    thetas = [torch.tensor([0.3, -0.2], dtype=torch.float64), torch.tensor([1.1, 0.4], dtype=torch.float64)]
    logps = []
    for theta in thetas:
        policy.theta.data.copy_(theta)
        logps.append(policy().detach())
    policy.theta.data.copy_(extrapolate_parameters(thetas[1], thetas[0], 0.7))
    torch.testing.assert_close(policy().detach(), extrapolate_logprobs(logps[1], logps[0], 0.7))


# The command -----------------------------------------------------------------------------------------------

TINY_TESTBED = ["bandit.num_prompts=4", "bandit.num_responses=4", "dpo_optimum.sample_sizes=[1000,10000]",
                "constrained.bandit.num_prompts=8", "constrained.gradient_steps=5", "reference_noise.num_pairs=200",
                "reference_noise.gradient_steps=5", "apo.rounds=3", "apo.alphas=[0.0,0.5]", "apo.mlp_hidden=4",
                "apo.max_iter=30", "mcpo.normaliser.num_negatives=[1,4]", "mcpo.normaliser.repeats=500",
                "mcpo.training.pool_size=4", "mcpo.training.pools_per_prompt=32", "mcpo.training.steps=20",
                "mcpo.training.batch_size=16", "mcpo.training.seeds=1", "mcpo.training.eval_every=5",
                "mcpo.training.stationarity_pools=256"]


def test_testbed_config_composes_with_any_loss():
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("testbed", overrides=["loss=ipo"])
    assert cfg.loss._target_ == "prefrun.losses.ipo_loss" and cfg.output.markdown == "docs/testbed.md"
    assert math.isclose(cfg.loss.beta, 0.1)


@pytest.mark.slow
def test_prefrun_testbed_writes_the_report_and_plots(tmp_path):
    markdown, plots = tmp_path / "docs" / "testbed.md", tmp_path / "docs" / "testbed"
    run_cli(["testbed", *TINY_TESTBED, f"output.markdown={markdown}", f"output.plots_dir={plots}"], tmp_path)
    text = markdown.read_text()
    for section in ("## (a)", "## (b)", "## (c)", "## (d)", "## (e)", "## Reproduce"):
        assert section in text
    assert "the claim KL < 0.0001 **holds**" in text
    assert "`loss=mcpo_cd` (−r_w + mean of the draws' r_θ)" in text and "shared/" not in text
    pngs = sorted(plots.glob("*.png"))
    assert len(pngs) == 5
    for png in pngs:
        assert png.read_bytes().startswith(b"\x89PNG") and f"](testbed/{png.name})" in text
    assert list((tmp_path / "outputs" / "testbed").glob("*/*/testbed.json"))  # Hydra's run dir keeps the numbers
