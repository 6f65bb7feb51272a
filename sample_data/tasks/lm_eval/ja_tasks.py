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
- Loaders for data that is not on the Hub as parquet (NIILC's XML, JMMLU's CSVs): lm-eval calls
  `custom_dataset` with the YAML's `dataset_kwargs`; each reads the files pinned there (a URL,
  downloaded once into the datasets cache, or a local path) and returns a `datasets.DatasetDict`.
  A malformed file is an error naming the file and line.
"""

import csv
import importlib.util
import logging
import xml.etree.ElementTree as ElementTree
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


# ----- NIILC and JMMLU: files that are not parquet on the Hub ------------------------------------
logger = logging.getLogger(__name__)


class TaskDataError(ValueError):
    """A task's data file that cannot be read as its benchmark's format (names file and line)."""


def _local_copies(data_files):
    """{name: local path} of `data_files` ({name: URL or path}): URLs downloaded once into the
    datasets cache (datasets' own downloader: cached, offline when cached), paths as they are."""
    from datasets import DownloadManager

    return DownloadManager().download(dict(data_files))


NIILC_NO_ANSWER = "-"  # NIILC's answer when the annotators found none in Wikipedia


def niilc_questions(path, source=None):
    """The questions of one NIILC-ECQA2015 XML file: [{"id", "question", "answers": [str]}].
    Empty <answer/> elements are dropped (as llm-jp-eval's NIILCDatasetProcessor); a question
    whose only answer is "-" (none found) is left out and counted in the log."""
    source = source or str(path)
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        line, column = error.position
        raise TaskDataError(f"{source}:{line}: not well-formed XML (column {column}): {error.msg}") from None
    if root.tag != "questions":
        raise TaskDataError(f"{source}: root element <{root.tag}>, expected NIILC's <questions>")
    questions, unanswered = [], []
    for number, element in enumerate(root.findall("question"), start=1):
        qid = element.get("id") or f"question {number}"
        text = (element.findtext("text") or "").strip()
        if not text:
            raise TaskDataError(f"{source}: {qid}: no <text> (the question)")
        answers = [(answer.text or "").strip() for answer in element.iterfind("answers/answer")]
        answers = [answer for answer in answers if answer]
        if not answers:
            raise TaskDataError(f"{source}: {qid}: no <answer> under <answers>")
        if answers == [NIILC_NO_ANSWER]:
            unanswered.append(qid)
            continue
        questions.append({"id": qid, "question": text, "answers": answers})
    if unanswered:
        logger.warning("%s: %d questions without an answer ('%s') left out: %s", source, len(unanswered),
                       NIILC_NO_ANSWER, ", ".join(unanswered))
    return questions


def load_niilc(data_files, **kwargs):
    """NIILC (`custom_dataset` of ja_niilc.yaml): {split: XML URL or path} -> DatasetDict."""
    from datasets import Dataset, DatasetDict

    local = _local_copies(data_files)
    return DatasetDict({split: Dataset.from_list(niilc_questions(local[split], data_files[split]))
                        for split in data_files})


JMMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")
# Subject names in Japanese, as JMMLU's README lists them (the prompt names the subject, as MMLU's)
JMMLU_SUBJECTS_JA = {
    "abstract_algebra": "抽象代数", "anatomy": "解剖学", "astronomy": "天文学", "business_ethics": "ビジネス倫理",
    "clinical_knowledge": "臨床知識", "college_biology": "大学生物学", "college_chemistry": "大学化学",
    "college_computer_science": "大学コンピュータ科学", "college_mathematics": "大学数学", "college_medicine": "大学医学",
    "college_physics": "大学物理", "computer_security": "コンピュータセキュリティ", "conceptual_physics": "概念物理学",
    "econometrics": "計量経済学", "electrical_engineering": "電気工学", "elementary_mathematics": "初等数学",
    "formal_logic": "形式論理", "global_facts": "世界事実", "high_school_biology": "高校生物学",
    "high_school_chemistry": "高校化学", "high_school_computer_science": "高校情報科学",
    "high_school_european_history": "高校ヨーロッパ史", "high_school_geography": "高校地理",
    "high_school_macroeconomics": "高校マクロ経済学", "high_school_mathematics": "高校数学",
    "high_school_microeconomics": "高校ミクロ経済学", "high_school_physics": "高校物理",
    "high_school_psychology": "高校心理学", "high_school_statistics": "高校統計学", "human_aging": "人間の老化",
    "human_sexuality": "セクシュアリティ", "international_law": "国際法", "japanese_civics": "公民",
    "japanese_geography": "日本地理", "japanese_history": "日本史", "japanese_idiom": "熟語", "jurisprudence": "法理学",
    "logical_fallacies": "論理学", "machine_learning": "機械学習", "management": "経営学", "marketing": "マーケティング",
    "medical_genetics": "医学遺伝学", "miscellaneous": "雑学", "moral_disputes": "倫理的議論", "nutrition": "栄養学",
    "philosophy": "哲学", "prehistory": "先史学", "professional_accounting": "専門会計",
    "professional_medicine": "専門医学", "professional_psychology": "専門心理学", "public_relations": "公共関係",
    "security_studies": "セキュリティ研究", "sociology": "社会学", "virology": "ウイルス学", "world_history": "世界史",
    "world_religions": "世界宗教",
}


def jmmlu_questions(path, subject, source=None):
    """The questions of one JMMLU subject CSV (UTF-8 with BOM, no header; question, A, B, C, D,
    answer letter): [{"id", "subject", "subject_ja", "question", "choices", "label"}] in file order."""
    source = source or str(path)
    questions = []
    with open(path, encoding="utf-8-sig", newline="") as stream:
        reader = csv.reader(stream)
        line = 1  # where the next record starts (a quoted field may span lines)
        try:
            for row in reader:
                start, line = line, reader.line_num + 1
                if not row:
                    continue
                if len(row) != len(JMMLU_COLUMNS):
                    raise TaskDataError(f"{source}:{start}: {len(row)} columns, expected {len(JMMLU_COLUMNS)} "
                                        f"({', '.join(JMMLU_COLUMNS)})")
                letter = row[5].strip()
                if letter not in ("A", "B", "C", "D"):
                    raise TaskDataError(f"{source}:{start}: answer {row[5]!r}, expected one of A, B, C, D")
                questions.append({"id": f"{subject}-{len(questions)}", "subject": subject,
                                  "subject_ja": JMMLU_SUBJECTS_JA.get(subject, subject), "question": row[0],
                                  "choices": row[1:5], "label": "ABCD".index(letter)})
        except csv.Error as error:
            raise TaskDataError(f"{source}:{reader.line_num}: not valid CSV ({error})") from None
        except UnicodeDecodeError as error:
            raise TaskDataError(f"{source}: not UTF-8 ({error})") from None
    return questions


def load_jmmlu(data_files, fewshot_rows_per_subject=5, **kwargs):
    """JMMLU (`custom_dataset` of ja_jmmlu.yaml): {subject: CSV URL or path} -> DatasetDict with
    "train" = the first `fewshot_rows_per_subject` questions of each subject (the few-shot pool;
    JMMLU has no dev split) and "test" = the rest."""
    from datasets import Dataset, DatasetDict

    local = _local_copies(data_files)
    train, test = [], []
    for subject in data_files:
        questions = jmmlu_questions(local[subject], subject, data_files[subject])
        if len(questions) <= fewshot_rows_per_subject:
            raise TaskDataError(f"{data_files[subject]}: {len(questions)} questions; {fewshot_rows_per_subject} "
                                "are the few-shot pool, so at least one more is needed")
        train += questions[:fewshot_rows_per_subject]
        test += questions[fewshot_rows_per_subject:]
    return DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)})


class SameSubjectSampler(ContextSampler):
    """MMLU's few-shot examples with all subjects in one task: the first k examples of the
    evaluated question's own subject, in file order (lm-eval's `first_n` within each subject)."""

    def sample(self, n, eval_doc=None, df=None, **kwargs):
        pool = [doc for doc in (df or self.fewshot_docs())
                if eval_doc is None or (doc["subject"] == eval_doc["subject"] and doc != eval_doc)]
        if n > len(pool):
            subject = eval_doc["subject"] if eval_doc is not None else "any subject"
            raise ValueError(f"{n} few-shot examples of {subject} requested; the few-shot split has {len(pool)}")
        return pool[:n]
