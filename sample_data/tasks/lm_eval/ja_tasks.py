"""Document processing, metrics, few-shot sampling and character budgets for the task YAMLs
in this folder (lm-eval resolves `!function ja_tasks.NAME` next to the YAML).

- Classification metrics as Stability's JP harness (`BalancedMultipleChoiceTask`): MARC-ja is
  severely imbalanced, so a model that always answers the majority class scores its share in
  accuracy; balanced accuracy (mean recall over classes) gives it 1/classes, macro-F1 is shown.
  Each question keeps (gold, predicted) and the figure is computed over all questions by
  scikit-learn, as lm-eval does for its own `f1` / `mcc`.
- Few-shot examples stratified by label (Stability's JP harness samples JNLI's shots with
  `stratified=True`): with k shots and L labels the shots cycle through the labels.
- Generation budgets in CHARACTERS: lm-eval's budget is `max_gen_toks` tokens, which gives a
  denser tokenizer a longer answer. `FirstCharacters` cuts every answer to the task's budget;
  the YAML's `max_gen_toks` is only a safety cap (4 x characters + 8: a token decodes to at
  least one character except byte-fallback pieces, as `toolkit.evaluation.token_cap`).
- The upstream tasks' own functions (lm-eval's `japanese_leaderboard`) are re-exported, not
  copied, so that their scoring is lm-eval's.
"""

import importlib.util
from collections import defaultdict
from pathlib import Path

import numpy as np
from lm_eval.api.filter import Filter
from lm_eval.api.samplers import ContextSampler
from sklearn.metrics import balanced_accuracy_score, f1_score


def process_jcommonsenseqa(dataset):
    """The five options choice0..choice4 as one `choices` list (as lm-eval's own)."""
    return dataset.map(lambda doc: {"choices": [doc[f"choice{i}"] for i in range(5)]})


# ----- classification: balanced accuracy and macro-F1 over (gold, predicted) pairs ----------
def process_classification(doc, results):
    """Per question: accuracy, and the (gold, predicted) pair that balanced accuracy and
    macro-F1 aggregate. `results` holds (log-likelihood, is_greedy) per choice."""
    loglikelihoods = [result[0] if isinstance(result, (tuple, list)) else result for result in results]
    predicted, gold = int(np.argmax(loglikelihoods)), int(doc["label"])
    return {"balanced_acc": (gold, predicted), "macro_f1": (gold, predicted), "acc": float(predicted == gold)}


def balanced_accuracy(items):
    golds, predictions = zip(*items)
    return float(balanced_accuracy_score(golds, predictions))


def macro_f1(items):
    golds, predictions = zip(*items)
    return float(f1_score(golds, predictions, average="macro"))


class LabelStratifiedSampler(ContextSampler):
    """k few-shot examples that cycle through the labels (in an order drawn per question),
    each drawn at random among the examples of its label; never the evaluated document."""

    def sample(self, n, eval_doc=None, df=None, **kwargs):
        if n == 0:
            return []
        pool = [doc for doc in (df or self.fewshot_docs()) if doc != eval_doc]
        by_label = defaultdict(list)
        for doc in pool:
            by_label[doc["label"]].append(doc)
        labels = sorted(by_label)
        self.rnd.shuffle(labels)
        wanted = {label: n // len(labels) + (rank < n % len(labels)) for rank, label in enumerate(labels)}
        if any(wanted[label] > len(by_label[label]) for label in labels):
            raise ValueError(f"{n} stratified shots need {wanted} examples per label; the few-shot split has "
                             f"{ {label: len(docs) for label, docs in by_label.items()} }")
        drawn = {label: self.rnd.sample(by_label[label], wanted[label]) for label in labels}
        return [drawn[label][turn] for turn in range(max(wanted.values())) for label in labels
                if turn < wanted[label]]


# ----- generation: budgets in characters, character-level F1 -------------------------------
class FirstCharacters(Filter):
    """Keeps the first `max_characters` characters of every answer: the same answer length
    for every tokenizer (the generation budget in characters)."""

    def __init__(self, max_characters, **kwargs):
        super().__init__(**kwargs)
        self.max_characters = int(max_characters)

    def apply(self, resps, docs):
        return [[answer[: self.max_characters] for answer in answers] for answers in resps]


def _char_f1_module():
    # the project's `evaluate` module metrics/char_f1 (one definition for the ablation and lm-eval)
    path = Path(__file__).resolve().parents[3] / "metrics" / "char_f1" / "char_f1.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the char_f1 metric module (this file must stay in sample_data/tasks/lm_eval/)")
    spec = importlib.util.spec_from_file_location("project_char_f1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CHAR_F1 = None


def char_f1(references, predictions, **kwargs):
    """SQuAD-style F1 over the characters (spaces ignored) of one answer, as JGLUE's JSQuAD
    baseline and Stability's JP harness score JSQuAD (per question; aggregated by mean)."""
    global _CHAR_F1
    if _CHAR_F1 is None:
        _CHAR_F1 = _char_f1_module()
    return _CHAR_F1.f1(predictions[0], references[0])


# ----- lm-eval's own japanese_leaderboard functions, re-exported (their scoring is lm-eval's) --------
from lm_eval.tasks.japanese_leaderboard import (  # noqa: E402  (needs fugashi, unidic-lite, neologdn, emoji)
    ja_leaderboard_mgsm, ja_leaderboard_xlsum, ja_leaderboard_xwinograd,
)

process_xwinograd = ja_leaderboard_xwinograd.process_docs
process_mgsm_results = ja_leaderboard_mgsm.process_results
rouge2 = ja_leaderboard_xlsum.rouge2  # per question: (reference, answer); aggregated by rouge2_agg
rouge2_agg = ja_leaderboard_xlsum.rouge2_agg  # MeCab-tokenised ROUGE-2 F, bootstrap median of the mean
_ROUGE2_SCORER = None


def rouge2_f(references, predictions, **kwargs):
    """MeCab-tokenised ROUGE-2 F of one summary, with lm-eval's own tokenizer and scorer: a
    per-question figure (mean = what rouge2_agg estimates) that the ablation can resample."""
    global _ROUGE2_SCORER
    if _ROUGE2_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE2_SCORER = rouge_scorer.RougeScorer(["rouge2"], tokenizer=ja_leaderboard_xlsum.MecabTokenizer())
    return _ROUGE2_SCORER.score(references[0], predictions[0])["rouge2"].fmeasure


# ----- WMT20 en-ja / ja-en: BLEU as sacrebleu computes it, chrF per sentence ---------------------
def bleu_items(references, predictions, **kwargs):
    """Per sentence: (reference, translation), for the corpus BLEU below."""
    return references[0], predictions[0]


def _corpus_bleu(items, tokenize):
    from sacrebleu.metrics import BLEU

    references, translations = zip(*items)
    return BLEU(tokenize=tokenize).corpus_score(list(translations), [list(references)]).score


def bleu_ja(items):
    """Corpus BLEU into Japanese with sacrebleu's ja-mecab tokenizer (MeCab + IPAdic)."""
    return _corpus_bleu(items, "ja-mecab")


def bleu_en(items):
    """Corpus BLEU into English with sacrebleu's default 13a tokenizer."""
    return _corpus_bleu(items, "13a")


def chrf(references, predictions, **kwargs):
    """sacrebleu's chrF (character n-gram F-score, no word segmentation) of one translation: a
    per-sentence figure the ablation can resample, in [0, 100]."""
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(predictions[0], [references[0]]).score


def wmt20_documents(language_pair):
    """The WMT20 news test set of `language_pair` (en-ja or ja-en) as sacrebleu 2.6.0 downloads and
    checksums it: [{"id", "source", "reference"}], to write as the JSONL the WMT20 YAMLs read."""
    from sacrebleu.dataset import DATASETS

    dataset = DATASETS["wmt20"]
    dataset.process_to_text(language_pair)
    sources = dataset.get_source_file(language_pair)
    references = dataset.get_reference_files(language_pair)[0]
    with open(sources, encoding="utf-8") as source, open(references, encoding="utf-8") as reference:
        return [{"id": f"wmt20-{language_pair}-{i}", "source": s.rstrip("\n"), "reference": r.rstrip("\n")}
                for i, (s, r) in enumerate(zip(source, reference))]
