"""The ablation's test holds its level, has the resolution Holm needs, and reads small rows as
"too few items to tell"; Japanese tasks and English retention are separate Holm families."""

from types import SimpleNamespace

import numpy as np
import pytest

from toolkit.evaluation import holm_adjust
from toolkit.statistics import (
    DEFAULT_PERMUTATIONS, TOO_FEW, item_differences, paired_permutation_p, sign_flip_test, smallest_p, task_family,
)


def null_differences(rng, simulations, items, seeds, binary):
    """Per-item seed-averaged differences of two models with no true difference: on each item both
    models' results come from the same distribution (item difficulty shared, seed noise per run)."""
    difficulty = rng.random((simulations, 1, items))
    if binary:  # accuracy: 0/1 per item and seed
        first = (rng.random((simulations, seeds, items)) < difficulty).astype(float)
        second = (rng.random((simulations, seeds, items)) < difficulty).astype(float)
    else:  # a continuous score, e.g. char-F1 or nats
        first = difficulty + rng.normal(0, 0.3, (simulations, seeds, items))
        second = difficulty + rng.normal(0, 0.3, (simulations, seeds, items))
    return (second - first).mean(axis=1)


@pytest.mark.parametrize("seeds", [1, 3])
@pytest.mark.parametrize("items", [3, 6, 20, 100])
def test_the_test_holds_its_level_under_the_null(items, seeds):
    """Rejection rate at alpha 0.05 <= 6% (the percentile bootstrap rejected 25% at 3 items).
    999 Monte Carlo patterns here to keep it fast: the add-one estimator is valid for any count."""
    rng = np.random.default_rng(items * 10 + seeds)
    for binary in (False, True):
        p = sign_flip_test(null_differences(rng, 3000, items, seeds, binary), permutations=999, seed=items)
        assert p.shape == (3000,) and np.all((p > 0) & (p <= 1))
        assert np.mean(p < 0.05) <= 0.06, (items, seeds, binary, np.mean(p < 0.05))


def test_it_detects_a_real_difference_and_holm_over_100_rows_can_reach_005():
    rng = np.random.default_rng(0)
    strong = rng.normal(1.0, 0.3, 100)  # every item better
    p = paired_permutation_p([np.zeros(100)], [strong], permutations=DEFAULT_PERMUTATIONS, seed=0)
    assert p == smallest_p(100) == 2 / (DEFAULT_PERMUTATIONS + 1)
    adjusted = holm_adjust([p] + [0.5] * 99)  # 100 rows in one family
    assert adjusted[0] < 0.05
    # exact enumeration at few items: 2 of the 2**3 sign patterns are as extreme
    assert paired_permutation_p([np.zeros(3)], [np.ones(3)]) == smallest_p(3) == 0.25


def test_seeds_stay_together_as_one_block_per_item():
    items = np.random.default_rng(1).random(30)
    # +0.3 with seed 0 and -0.3 with seed 1 on every item: the seeds cancel, no effect left to find
    assert np.allclose(item_differences([items, items], [items + 0.3, items - 0.3]), 0)
    assert paired_permutation_p([items, items], [items + 0.3, items - 0.3]) > 0.3
    assert paired_permutation_p([items, items], [items + 0.3, items + 0.2]) < 0.001
    with pytest.raises(ValueError, match="same number"):
        item_differences([items, items], [items])


def test_a_ratio_is_tested_on_its_numerators_over_the_shared_text():
    characters = np.array([100.0, 200.0, 300.0])
    first = np.stack([characters * 2.0, characters], 1)
    second = np.stack([characters * 1.5, characters], 1)
    differences = item_differences([first], [second], ratio=True)
    # the differences sum to the ratio's difference (nats per character here)
    assert differences.sum() == pytest.approx(1.5 - 2.0)
    with pytest.raises(ValueError, match="same text"):
        item_differences([first], [np.stack([characters * 1.5, characters + 1], 1)], ratio=True)


def test_japanese_tasks_and_english_retention_are_separate_families():
    assert [task_family(t) for t in ("heldout_ja", "heading_mc", "lm_eval:ja_jglue_jnli")] == ["japanese"] * 3
    assert [task_family(t) for t in ("heldout_en", "lm_eval:hellaswag", "lm_eval:mmlu_computer_security")] == [
        "english"] * 3


def test_rows_under_the_minimum_read_too_few_items_and_holm_runs_per_family(monkeypatch):
    import evaluate_ablation

    monkeypatch.setattr(evaluate_ablation, "paired_permutation_p", lambda *a, **k: 0.02)
    big, small = [0.0, 1.0] * 10, [0.0, 1.0]
    results = {name: [{("t_ja", "accuracy"): big, ("t2_ja", "accuracy"): big, ("small", "accuracy"): small,
                       ("heldout_en", "bits_per_character"): [(1.0 + (name == "b"), 10.0)] * 20}]
               for name in ("a", "b")}
    primary = {"t_ja": "accuracy", "t2_ja": "accuracy", "small": "accuracy", "heldout_en": "bits_per_character"}
    args = SimpleNamespace(bootstrap_samples=50, seed=0, alpha=0.05, permutations=99, min_items_for_verdict=20)
    rows = {row["task"]: row["effects"]["e"]
            for row in evaluate_ablation.compare(["a", "b"], [("e", "b", "a")], results, primary, args)}
    assert rows["small"]["verdict"] == TOO_FEW and rows["small"]["p_holm"] is None
    # two Japanese rows in their family (0.02 x 2), the English row alone in its own (0.02 x 1)
    assert rows["t_ja"]["p_holm"] == pytest.approx(0.04) and rows["t2_ja"]["p_holm"] == pytest.approx(0.04)
    assert rows["heldout_en"]["p_holm"] == pytest.approx(0.02) and rows["heldout_en"]["verdict"] == "worse"
    table = evaluate_ablation.markdown_table(["a", "b"], [("e", "b", "a")], list(
        evaluate_ablation.compare(["a", "b"], [("e", "b", "a")], results, primary, args)), {}, None)
    assert f"| small | **accuracy** ↑ | 2 | 0.500 | 0.500 | +0.000 |" in table and TOO_FEW in table


def test_a_figure_over_all_items_is_tested_by_swapping_the_models_rows():
    from toolkit.evaluation import balanced_accuracy_of_rows
    from toolkit.statistics import paired_swap_p

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, size=40)
    right = np.stack([gold, gold], axis=1)  # always right
    guess = np.stack([gold, rng.integers(0, 3, size=40)], axis=1)  # a third right
    # a real difference is found, and it does not matter which model is first
    assert paired_swap_p([guess], [right], balanced_accuracy_of_rows, permutations=999) < 0.01
    assert paired_swap_p([right], [guess], balanced_accuracy_of_rows, permutations=999) < 0.01
    # the same rows for both models: every swap gives the observed figure, nothing is found
    assert paired_swap_p([guess], [guess.copy()], balanced_accuracy_of_rows, permutations=999) == 1.0
    # exact at few items: 4 items have 16 swap patterns, so p is a multiple of 1/16 (2/16 at least)
    p = paired_swap_p([guess[:4]], [right[:4]], balanced_accuracy_of_rows)
    assert p * 16 == round(p * 16) and p >= 2 / 16
    with pytest.raises(ValueError, match="same items"):
        paired_swap_p([guess], [right[:10]], balanced_accuracy_of_rows)


def test_the_swap_test_holds_its_level_under_the_null():
    from toolkit.evaluation import balanced_accuracy_of_rows
    from toolkit.statistics import paired_swap_p

    rng = np.random.default_rng(1)
    rejections = 0
    trials = 200
    for _ in range(trials):  # two models of the same skill: each item's prediction right with p 0.6
        gold = rng.integers(0, 2, size=20)
        first, second = ([np.stack([gold, np.where(rng.random(20) < 0.6, gold, 1 - gold)], axis=1)]
                         for _ in range(2))
        rejections += paired_swap_p(first, second, balanced_accuracy_of_rows, permutations=199, seed=0) < 0.05
    assert rejections / trials <= 0.08  # 5% expected; 200 trials: a binomial 95% bound of ~8%
