"""Each loss against values worked out by hand (math module, not torch)."""

import math

import pytest
import torch

from prefrun.losses import dpo_loss, ipo_loss, log_reference_noise, mcpo_loss

# One pair: log π_θ(y_w)=-2, log π_θ(y_l)=-5, log π_ref(y_w)=-3, log π_ref(y_l)=-4; |y_w|=4, |y_l|=2.
POLICY = torch.tensor([[-2.0, -5.0]])
REFERENCE = torch.tensor([[-3.0, -4.0]])
LENGTHS = torch.tensor([[4, 2]])


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_by_hand():
    beta = 0.1
    # r_w = 0.1·(-2+3) = 0.1, r_l = 0.1·(-5+4) = -0.1, Δ = 0.2
    losses, rewards = dpo_loss(POLICY, REFERENCE, LENGTHS, beta=beta)
    assert rewards[0].tolist() == pytest.approx([0.1, -0.1])
    assert losses.item() == pytest.approx(-log_sigmoid(0.2), abs=1e-7)  # 0.598139


def test_dpo_label_smoothing_and_nll_by_hand():
    losses, _ = dpo_loss(POLICY, REFERENCE, LENGTHS, beta=0.1, label_smoothing=0.2, nll_weight=0.5)
    expected = -0.8 * log_sigmoid(0.2) - 0.2 * log_sigmoid(-0.2) + 0.5 * (2.0 / 4)
    assert losses.item() == pytest.approx(expected, abs=1e-7)


def test_ipo_by_hand():
    # h = (−2+3) − (−5+4) = 2; β = 0.25 -> (2 − 2)² = 0; β = 0.5 -> (2 − 1)² = 1
    assert ipo_loss(POLICY, REFERENCE, LENGTHS, beta=0.25)[0].item() == pytest.approx(0.0)
    assert ipo_loss(POLICY, REFERENCE, LENGTHS, beta=0.5)[0].item() == pytest.approx(1.0)


def test_mcpo_with_one_negative_is_dpo_and_by_hand_with_two():
    policy, reference = torch.randn(5, 2), torch.randn(5, 2)
    lengths = torch.ones(5, 2)
    torch.testing.assert_close(mcpo_loss(policy, reference, lengths, beta=0.3)[0],
                               dpo_loss(policy, reference, lengths, beta=0.3)[0])
    # rewards [0.1, -0.1, 0.3]: −log(e^0.1 / (e^0.1 + e^-0.1 + e^0.3))
    losses, _ = mcpo_loss(torch.tensor([[-2.0, -5.0, 0.0]]), torch.tensor([[-3.0, -4.0, -3.0]]),
                          torch.ones(1, 3), beta=0.1)
    expected = -math.log(math.exp(0.1) / (math.exp(0.1) + math.exp(-0.1) + math.exp(0.3)))
    assert losses.item() == pytest.approx(expected, abs=1e-7)


def test_dpo_rejects_several_negatives():
    with pytest.raises(ValueError, match="loss=mcpo"):
        dpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), beta=0.1)


def test_log_reference_noise_by_hand():
    # β·(log π_ref(y_l) − log π_ref(y_w)) = 0.1·(−4 + 3) = −0.1: the reference prefers the winner
    assert log_reference_noise(REFERENCE, 0.1).item() == pytest.approx(-0.1)
    # ALGORITHMS.md / paper 001 eq. 12: L_DPO = log(γ + u) up to the θ-free constant −log γ
    beta = 0.7
    log_gamma = log_reference_noise(REFERENCE, beta)
    log_u = beta * (POLICY[:, 1] - POLICY[:, 0])
    losses, _ = dpo_loss(POLICY, REFERENCE, LENGTHS, beta=beta)
    # −log σ(Δ) = log(1 + e^{−Δ}) = log(γ + u) − log γ
    torch.testing.assert_close(losses, torch.logaddexp(log_gamma, log_u) - log_gamma)
