"""Pseudo-preference labels: r + lambda.g, the Bradley-Terry probability at the label temperature
beta_policy / beta_dual, and refusals (expectations written out by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from openrlhf_dual.labels import combined_reward, pair_labels


def test_combined_reward_with_two_constraints():
    got = combined_reward([1.0, -2.0], [[0.5, 2.0], [1.0, -1.0]], [2.0, 0.25])
    assert got.dtype == np.float64 and got.tolist() == [1.0 + 1.0 + 0.5, -2.0 + 2.0 - 0.25]
    # one constraint: safety may be [n] or [n, 1], lambda a scalar or [1]
    assert combined_reward([1.0, 2.0], [3.0, 4.0], 0.5).tolist() == [2.5, 4.0]
    assert combined_reward([1.0, 2.0], [[3.0], [4.0]], [0.5]).tolist() == [2.5, 4.0]


def test_combined_reward_refuses_a_lambda_of_the_wrong_length():
    with pytest.raises(ValueError, match="2 constraints per response but lambda has 3"):
        combined_reward([1.0], [[1.0, 2.0]], [1.0, 2.0, 3.0])


def test_pair_labels_values_and_temperature():
    # chosen r + lam.g = 1 + 2 * 0.5 - 1 * 1 = 1; rejected 0 + 2 * 1 + 0 = 2: margin -1
    args = (np.array([1.0]), np.array([[0.5, -1.0]]), np.array([0.0]), np.array([[1.0, 0.0]]), np.array([2.0, 1.0]))
    assert pair_labels(*args, 0.5, 0.5)[0] == pytest.approx(1 / (1 + np.e), rel=1e-12)
    assert pair_labels(*args, 0.5, 1.5)[0] == pytest.approx(1 / (1 + np.exp(3.0)), rel=1e-12)  # t = 3
    assert pair_labels(*args, 2.0, 1.0)[0] == pytest.approx(1 / (1 + np.exp(0.5)), rel=1e-12)  # t = 1/2
    # stable far out in the tails, and exactly symmetric
    far = pair_labels(np.array([800.0, -800.0]), np.zeros((2, 1)), np.zeros(2), np.zeros((2, 1)), [0.0], 1.0, 1.0)
    assert far.tolist() == [1.0, 0.0]
    tiny = pair_labels(np.array([-40.0]), np.zeros((1, 1)), np.zeros(1), np.zeros((1, 1)), [0.0], 1.0, 1.0)
    assert tiny[0] == pytest.approx(np.exp(-40.0), rel=1e-9)


@pytest.mark.parametrize("beta_dual, beta_policy", [(0.0, 0.1), (0.1, 0.0), (-1.0, 0.1), (0.1, -0.5)])
def test_pair_labels_refuse_non_positive_betas(beta_dual, beta_policy):
    with pytest.raises(ValueError, match="betas must be positive"):
        pair_labels(np.zeros(1), np.zeros((1, 1)), np.zeros(1), np.zeros((1, 1)), [1.0], beta_dual, beta_policy)


def test_pair_labels_refuse_non_finite_scores_and_count_them():
    bad = np.array([0.0, np.nan, np.inf])
    with pytest.raises(ValueError, match="^2 pairs have non-finite scores"):
        pair_labels(bad, np.zeros((3, 1)), np.zeros(3), np.zeros((3, 1)), [1.0], 0.1, 0.1)
