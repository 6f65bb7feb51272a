"""Significance and effect size for the fine-tuned ablation (`evaluate_ablation.py`).

- The test: a paired sign-flip permutation test over items (`scipy.stats.permutation_test`,
  `permutation_type="samples"` on one sample, which flips signs). The fine-tuning seeds of an
  item stay together as a block: an item's difference is averaged over seeds first, and a
  permutation swaps the two models on ALL seeds of that item at once. Under the null (the two
  models' results on each item are exchangeable) every sign pattern is equally likely, so the
  test holds its level at any number of items, where a percentile bootstrap does not (it
  rejected 25% of null cases at 3 items). Exact when the 2**n patterns are at most
  `permutations`; otherwise `permutations` random patterns with the add-one estimator (the
  observed pattern counts as one draw), so a tail is at least 1/(permutations + 1): with the
  default 9,999 the smallest two-sided p is 2e-4, and Holm over 100 rows can still reach 0.02.
- The statistic is the mean over seeds of the per-seed difference of the task's figure: a
  mean of per-item scores, or a ratio of sums (bits per character: summed nats over summed
  characters). The ratio's denominators are the same text for both models, so the ratio's
  difference is a sum of per-item differences of the numerators over a constant: the same
  sign-flip test on those differences.
- Effect size: the paired bootstrap interval over seeds and items
  (`toolkit.evaluation.bootstrap_difference`) stays; the test decides, the interval measures.
- Holm's correction runs per family (Japanese tasks, English retention) and effect; a row
  with fewer than `min_items` items gets no verdict ("too few items to tell").
"""

import math

import numpy as np
from scipy.stats import permutation_test

TOO_FEW = "too few items to tell"
DEFAULT_PERMUTATIONS = 9999


def paired_runs(first_runs, second_runs, dtype=float):
    """The two models' runs (one per-item array per seed) as arrays, checked to pair up: the
    same number (>= 1) of seeds, non-empty, over the same items. The test and the bootstrap
    interval both start here."""
    first = [np.asarray(run, dtype=dtype) for run in first_runs]
    second = [np.asarray(run, dtype=dtype) for run in second_runs]
    if not first or len(first) != len(second):
        raise ValueError("paired runs need the same number (>= 1) of seeds for both models")
    size = len(first[0])
    if size == 0 or any(len(run) != size for run in first + second):
        raise ValueError("paired runs need non-empty arrays over the same items for every seed")
    return first, second


def item_differences(first_runs, second_runs, ratio=False):
    """Per-item difference second - first, averaged over seeds (the seeds of an item are one block).

    Runs hold one per-item array per seed, over the same items; with `ratio` each row is
    (numerator, denominator), e.g. (nats, characters), and the differences are of numerators
    divided by the (shared) total denominator, so that they sum to the ratio's difference.
    """
    first, second = paired_runs(first_runs, second_runs)
    if not ratio:
        return np.mean([b - a for a, b in zip(first, second)], axis=0)
    for a, b in zip(first, second):
        if not np.array_equal(a[:, 1], b[:, 1]):
            raise ValueError("a ratio's denominators (e.g. characters of held-out text) must be the same for "
                             "both models: they are the same text")
    total = first[0][:, 1].sum()
    return np.mean([(b[:, 0] - a[:, 0]) / total for a, b in zip(first, second)], axis=0)


def sign_flip_test(differences, permutations=DEFAULT_PERMUTATIONS, seed=0):
    """Two-sided p-value(s) that paired per-item differences are centred on zero.

    `differences` is (..., items): leading axes are independent tests (one call tests a whole
    simulation). Exact when 2**items <= permutations, else Monte Carlo with the add-one
    estimator; deterministic for a given seed.
    """
    differences = np.asarray(differences, dtype=float)
    # patterns per vectorised call: ~4M numbers at a time keeps a whole simulation in cache-sized memory
    batch = max(1, 2 ** 22 // differences.size)
    result = permutation_test((differences,), np.mean, permutation_type="samples", vectorized=True,
                              n_resamples=permutations, batch=batch, alternative="two-sided", axis=-1, rng=seed)
    return np.minimum(result.pvalue, 1.0)


def paired_permutation_p(first_runs, second_runs, ratio=False, permutations=DEFAULT_PERMUTATIONS, seed=0):
    """p-value of the sign-flip test for statistic(second) - statistic(first) over seeds and items."""
    return float(sign_flip_test(item_differences(first_runs, second_runs, ratio), permutations, seed))


def paired_swap_p(first_runs, second_runs, statistic, permutations=DEFAULT_PERMUTATIONS, seed=0):
    """p-value of the paired swap test for a figure computed over all items at once (balanced
    accuracy, macro-F1 of (gold, predicted) rows), where per-item differences do not exist.

    Under the null the two models' rows of an item are exchangeable, so a permutation swaps
    the two models' rows of an item, on all its seeds at once (the seeds of an item are one
    block, as in the sign-flip test); the statistic is the mean over seeds of
    statistic(second) - statistic(first). `scipy.stats.permutation_test`'s paired "samples"
    permutation does exactly that swap on two arrays of row indices; exact when the 2**items
    patterns are at most `permutations`, else Monte Carlo with the add-one estimator.
    """
    first, second = paired_runs(first_runs, second_runs, dtype=None)
    size = len(first[0])
    # rows 0..size-1 of a seed are the first model's, size..2*size-1 the second's
    stacked = [np.concatenate([a, b]) for a, b in zip(first, second)]

    def difference(first_rows, second_rows):
        return np.mean([statistic(rows[second_rows]) - statistic(rows[first_rows]) for rows in stacked])

    result = permutation_test((np.arange(size), np.arange(size, 2 * size)), difference, permutation_type="samples",
                              n_resamples=permutations, alternative="two-sided", rng=seed)
    return float(min(result.pvalue, 1.0))


def smallest_p(items, permutations=DEFAULT_PERMUTATIONS):
    """The smallest two-sided p-value the test can give at this many items."""
    if items * math.log10(2) <= math.log10(permutations):  # exact: 2 of the 2**items patterns are as extreme
        return 2 / 2 ** items
    return min(1.0, 2 / (permutations + 1))


def task_family(task):
    """"english" for English-retention rows (held-out English, lm-eval tasks not named ja_*), else
    "japanese": each family gets its own Holm correction."""
    if task == "heldout_en":
        return "english"
    if task.startswith("lm_eval:"):
        return "japanese" if task.split(":", 1)[1].startswith("ja_") else "english"
    return "english" if task.endswith("_en") else "japanese"
