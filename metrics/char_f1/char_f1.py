# Licensed under the Apache License, Version 2.0.
"""Character-level F1 and ROUGE-L for Japanese (and other unsegmented) text.

Word-level metrics need word boundaries that Japanese does not write, and the default
tokeniser of `rouge_score` (used by evaluate's `rouge`) keeps only [a-z0-9], so a
Japanese answer scores 0 against anything. Here every non-space character is a token:
- `char_f1`: SQuAD-style F1 over the multiset of characters (precision = shared
  characters / predicted characters, recall = shared / reference characters);
- `char_rouge_l`: ROUGE-L F-measure over the character sequences (longest common
  subsequence), as `rouge_score` computes it with a character tokeniser.
Both are means over examples in [0, 1]; `return_scores=True` adds per-example lists.
"""

from collections import Counter

import datasets

import evaluate

_DESCRIPTION = "Character-level F1 and ROUGE-L (LCS) between predictions and references; spaces ignored."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted texts.
    references: list of reference texts.
    return_scores: if true, also return `char_f1_scores` and `char_rouge_l_scores` per example.
Returns:
    char_f1, char_rouge_l: means over examples, in [0, 1].
"""


def characters(text):
    return [character for character in text if not character.isspace()]


def f1(prediction, reference):
    predicted, expected = characters(prediction), characters(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction, reference):
    from rouge_score import rouge_scorer, tokenizers

    class CharacterTokenizer(tokenizers.Tokenizer):
        def tokenize(self, text):
            return characters(text)

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharacterTokenizer())
    return scorer.score(reference, prediction)["rougeL"].fmeasure


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CharF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string", id="sequence"),
                 "references": datasets.Value("string", id="sequence")}
            ),
        )

    def _compute(self, predictions, references, return_scores=False):
        f1_scores = [f1(p, r) for p, r in zip(predictions, references)]
        rouge_scores = [rouge_l(p, r) for p, r in zip(predictions, references)]
        count = max(len(f1_scores), 1)
        result = {"char_f1": sum(f1_scores) / count, "char_rouge_l": sum(rouge_scores) / count}
        if return_scores:
            result.update(char_f1_scores=f1_scores, char_rouge_l_scores=rouge_scores)
        return result
