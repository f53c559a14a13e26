"""Training pairs from reference samples: disjoint pairing, identical pairs dropped, each row's
scores kept with its own text, `chosen` by r + lambda.g (expectations written out by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from openrlhf_dual.pairs import pair_row, pairs_from_samples


def row(prompt, pid, chosen, c_scores, rejected, r_scores):
    return {
        "prompt": prompt, "prompt_id": pid, "chosen": chosen, "rejected": rejected,
        "chosen_reward": c_scores[0], "chosen_safety": list(c_scores[1:]),
        "rejected_reward": r_scores[0], "rejected_safety": list(r_scores[1:]),
    }  # fmt: skip


def test_pairs_are_disjoint_consecutive_samples_and_identical_ones_are_dropped():
    prompts = [{"id": 7, "prompt": "P7", "raw": "r7"}, {"id": 3, "prompt": "P3", "raw": "r3"}]
    # K = 5: pairs (0, 1), (2, 3); sample 4 is left over. m = 2 safeties.
    responses = [["a", "b", "c", "c", "e"], ["f", "g", "h", "i", "j"]]
    scores = np.array([
        [[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0], [9.0, 9.0, 9.0]],
        [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [3.0, -1.0, 0.0], [9.0, 9.0, 9.0]],
    ])  # fmt: skip
    lam = np.array([2.0, 0.5])
    rows, dropped = pairs_from_samples(prompts, responses, scores, lam)
    assert dropped == 1  # ("c", "c")
    assert rows == [
        # r + lam.g: a 1, b 2 -> b chosen
        row("P7", 7, "b", (2.0, 0.0, 0.0), "a", (1.0, 0.0, 0.0)),
        # f: 0 + 2 = 2, g: 1 -> f chosen (the second response loses)
        row("P3", 3, "f", (0.0, 1.0, 0.0), "g", (1.0, 0.0, 0.0)),
        # h: 0 + 0.5 * 2 = 1, i: 3 - 2 = 1 -> a tie keeps the first as chosen
        row("P3", 3, "h", (0.0, 0.0, 2.0), "i", (3.0, -1.0, 0.0)),
    ]
    assert all(isinstance(v, float) for r in rows for v in (r["chosen_reward"], *r["chosen_safety"]))


def test_pairs_depend_on_lambda_only_through_which_is_chosen():
    prompts = [{"id": 0, "prompt": "P"}]
    scores = np.array([[[1.0, -1.0], [0.0, 1.0]]])  # helpful-unsafe against safe
    unsafe_first, _ = pairs_from_samples(prompts, [["x", "y"]], scores, np.array([0.0]))
    safe_first, _ = pairs_from_samples(prompts, [["x", "y"]], scores, np.array([1.0]))
    assert (unsafe_first[0]["chosen"], safe_first[0]["chosen"]) == ("x", "y")  # 1 > 0; then -0 < 1
    assert unsafe_first[0]["chosen_safety"] == safe_first[0]["rejected_safety"] == [-1.0]


def test_no_pairs_from_a_single_sample_or_all_identical():
    assert pairs_from_samples([{"id": 0, "prompt": "P"}], [["x"]], np.zeros((1, 1, 2)), np.ones(1)) == ([], 0)
    rows, dropped = pairs_from_samples([{"id": 0, "prompt": "P"}], [["x"] * 4], np.zeros((1, 4, 2)), np.ones(1))
    assert (rows, dropped) == ([], 2)


def test_pair_row_refuses_a_lambda_of_the_wrong_length():
    with pytest.raises(ValueError, match="2 constraints per response but lambda has 1"):
        pair_row("P", 0, ("x", "y"), np.zeros((2, 3)), np.ones(1))
