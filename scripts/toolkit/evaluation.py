"""Evaluation building blocks for the fine-tuned ablation (`evaluate_ablation.py`).

- Task files: JSONL, one question per line. Multiple choice: `{"id", "prompt", "choices",
  "label"}`; generation: `{"id", "prompt", "reference"}` (see `sample_data/tasks/README.md`).
  Every record may declare the task's `primary_metric` (the same in all records): the one
  figure of the task the verdict counts; the others are shown, not counted.
- Multiple choice is scored by log-likelihood of each choice (with the template's
  separator in front, as in fine-tuning) after the chat-rendered prompt, divided by the
  choice's length in characters: comparable across tokenizers (a per-token average would
  favour a tokenizer that cuts the answer into more pieces).
- Generation: greedy decoding until EOS or a budget in CHARACTERS (the same answer length
  for every tokenizer; a token budget gives a denser tokenizer a longer answer); whether
  it stopped with EOS; metrics through `evaluate` modules shipped in `metrics/`, loaded
  by path (offline).
- Decoding speed and what free generation writes: `toolkit.speed`.
- Paired bootstrap interval over fine-tuning seeds and examples for the difference between
  two models, seeded (the test itself: `toolkit.statistics`); Holm's correction.
- lm-evaluation-harness through its Python API on an in-memory model.
"""

import contextlib
import functools
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from toolkit.chat import answer_text, content_spans, encode_prompt, encode_rendered, prompt_text
from toolkit.corpus import CorpusError, iter_records
from toolkit.statistics import paired_runs

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
METRICS_DIR = REPO_ROOT / "metrics"


class TaskError(CorpusError):
    """A malformed task file, with the file and line at fault."""


# The figure each kind of task is judged by, unless its records declare `primary_metric`.
DEFAULT_PRIMARY_METRIC = {"multiple_choice": "accuracy", "generation": "char_f1"}
TASK_METRICS = {"multiple_choice": ("accuracy",),
                "generation": ("char_f1", "char_rouge_l", "exact_match", "stops_with_eos")}


@dataclass
class Task:
    name: str
    kind: str  # "multiple_choice" or "generation"
    path: str
    examples: list
    primary_metric: str = None


def read_task(path, max_examples=None):
    """One task file; the kind follows from its records. Errors name file and line."""
    path = Path(path)
    examples, kind, primary, primary_line = [], None, None, None
    try:
        for line_number, record in iter_records(path, text_field="prompt"):
            where = f"{path}:{line_number}"
            if "choices" in record:
                choices, label = record["choices"], record.get("label")
                if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                    raise TaskError(f"{where}: 'choices' must be a list of at least two non-empty strings")
                if not isinstance(label, int) or not 0 <= label < len(choices):
                    raise TaskError(f"{where}: 'label' must be the index of the right choice (0..{len(choices) - 1})")
                record_kind = "multiple_choice"
            elif isinstance(record.get("reference"), str):
                record_kind = "generation"
            else:
                raise TaskError(f"{where}: a task record needs 'choices' and 'label', or a 'reference' string")
            if kind and record_kind != kind:
                raise TaskError(f"{where}: a {record_kind} record in a {kind} task file; keep one kind per file")
            kind = record_kind
            declared = record.get("primary_metric")
            if declared is not None:
                if declared not in TASK_METRICS[kind]:
                    raise TaskError(f"{where}: primary_metric {declared!r} is not a metric of a {kind} task "
                                    f"({', '.join(TASK_METRICS[kind])})")
                if primary is not None and declared != primary:
                    raise TaskError(f"{where}: primary_metric {declared!r}, but line {primary_line} declares "
                                    f"{primary!r}; one primary metric per task file")
                primary, primary_line = declared, line_number
            examples.append(record)
    except CorpusError as error:
        raise TaskError(str(error).replace("pass --skip_bad_records to count and skip such lines", "fix or remove it")) from error
    if not examples:
        raise TaskError(f"{path}: no task records")
    return Task(path.stem, kind, str(path), examples[:max_examples] if max_examples else examples,
                primary or DEFAULT_PRIMARY_METRIC[kind])


def read_tasks(task_dir, names=None, max_examples=None):
    """Every `*.jsonl` task in `task_dir` (or the named ones), sorted by name."""
    task_dir = Path(task_dir)
    paths = sorted(task_dir.glob("*.jsonl")) if not names else [task_dir / f"{name}.jsonl" for name in names]
    if not paths:
        raise TaskError(f"{task_dir}: no *.jsonl task files")
    for path in paths:
        if not path.is_file():
            raise TaskError(f"{path}: no such task file")
    return [read_task(path, max_examples) for path in paths]


@torch.no_grad()
def continuation_logprobs(model, tokenizer, context, continuations, context_data_spans=()):
    """Summed log-probability of each continuation after `context`.

    The text context + continuation is tokenised whole (as the model sees it) and the
    tokens that cover any continuation character are scored, so no tokenizer-specific
    boundary handling (SentencePiece's leading "▁", byte-level BPE merges) is needed.
    Continuations and `context_data_spans` (e.g. the user's question in a chat prompt) are
    data: special-token strings in them are text. The token prefix shared by all options
    runs once; its KV cache is repeated for a padded batch of the options' remaining tokens.
    """
    sequences, first_scored = [], []
    for continuation in continuations:
        ids, offsets = encode_rendered(tokenizer, context + continuation,
                                       [*context_data_spans, (len(context), len(context) + len(continuation))])
        first = next(i for i, (_, end) in enumerate(offsets) if end > len(context))
        if first == 0:
            raise ValueError("the context must contain at least one token before the continuation")
        sequences.append(ids)
        first_scored.append(first)
    shared = min(first_scored)  # the token before the first scored one must stay in every suffix
    while shared > 1 and any(ids[:shared - 1] != sequences[0][:shared - 1] for ids in sequences):
        shared -= 1
    shared -= 1  # tokens [0, shared) run once
    device = next(model.parameters()).device
    prefix = torch.tensor([sequences[0][:shared]], device=device)
    cache = model(input_ids=prefix, use_cache=True).past_key_values if shared else None
    suffixes = [ids[shared:] for ids in sequences]
    width = max(map(len, suffixes))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = torch.full((len(suffixes), width), pad, dtype=torch.long)
    mask = torch.zeros((len(suffixes), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for row, ids in enumerate(suffixes):
        batch[row, : len(ids)] = torch.tensor(ids)
        mask[row, shared: shared + len(ids)] = 1
    if cache is not None:
        cache.batch_repeat_interleave(len(suffixes))
    logits = model(input_ids=batch.to(device), attention_mask=mask.to(device), past_key_values=cache,
                   use_cache=cache is not None).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    scores = []
    for row, ids in enumerate(suffixes):
        start = first_scored[row] - shared  # index in the suffix of the first scored token
        targets = torch.tensor(ids[start:], device=device)
        positions = torch.arange(start - 1, len(ids) - 1, device=device)
        scores.append(logprobs[row, positions, targets].sum().item())
    return scores


def score_multiple_choice(model, tokenizer, template, example):
    """Index of the choice with the highest log-likelihood per character, and the scores.

    Each choice is scored as the model would write it after the prompt, with the template's
    separator in front (" choice" for the default template), as fine-tuning taught it.
    """
    context = prompt_text(tokenizer, example["prompt"], template)
    answers = [answer_text(tokenizer, example["prompt"], choice, template) for choice in example["choices"]]
    logprobs = continuation_logprobs(model, tokenizer, context, answers,
                                     content_spans(context, [{"content": example["prompt"]}]))
    per_character = [lp / max(len(choice), 1) for lp, choice in zip(logprobs, example["choices"])]
    return int(np.argmax(per_character)), per_character


class CharacterBudget(StoppingCriteria):
    """Stops each row once its new tokens decode to `max_characters` characters (EOS is the
    model's own stop, handled by `generate`)."""

    def __init__(self, tokenizer, prompt_width, max_characters, eos_token_id=None):
        self.tokenizer, self.width, self.max_characters, self.eos = tokenizer, prompt_width, max_characters, eos_token_id

    def __call__(self, input_ids, scores, **kwargs):
        done = []
        for row in input_ids[:, self.width:].tolist():
            if self.eos is not None and self.eos in row:
                row = row[: row.index(self.eos)]
            done.append(len(self.tokenizer.decode(row, skip_special_tokens=True)) >= self.max_characters)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def token_cap(max_new_characters):
    """A safety cap on new tokens for a character budget: a token decodes to at least one
    character except byte-fallback pieces (up to 4 per character) and special tokens."""
    return 4 * max_new_characters + 8


def left_padded(contexts, pad):
    width = max(map(len, contexts))
    ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, context in enumerate(contexts):
        ids[row, width - len(context):] = torch.tensor(context)
        mask[row, width - len(context):] = 1
    return ids, mask


@torch.no_grad()
def generate_answers(model, tokenizer, template, prompts, max_new_characters, batch_size=8):
    """Greedy answers, batched with left padding, until EOS or `max_new_characters`
    characters: [(text, stopped with EOS?, new tokens)]; text is cut to the budget."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    answers = []
    for first in range(0, len(prompts), batch_size):
        contexts = [encode_prompt(tokenizer, p, template) for p in prompts[first:first + batch_size]]
        ids, mask = left_padded(contexts, pad)
        budget = CharacterBudget(tokenizer, ids.shape[1], max_new_characters, eos)
        output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                max_new_tokens=token_cap(max_new_characters), do_sample=False, eos_token_id=eos,
                                pad_token_id=pad, stopping_criteria=StoppingCriteriaList([budget]))
        for row in output[:, ids.shape[1]:].tolist():
            new = row[: row.index(eos)] if eos in row else row
            while new and new[-1] == pad:  # a row that reached the budget before the others is padded
                new = new[:-1]
            text = tokenizer.decode(new, skip_special_tokens=True)
            # a row stopped by the budget is padded (pad may be EOS): EOS counts only before the budget
            stopped = eos in row and len(text) < max_new_characters
            # a budget reached inside a multi-byte character leaves its incomplete bytes as U+FFFD
            answers.append((text[:max_new_characters].rstrip("\ufffd").strip(), stopped, len(new)))
    return answers


def load_metric(name):
    """An `evaluate` metric module shipped in `metrics/<name>/`, loaded by path (no Hub)."""
    import evaluate

    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        raise FileNotFoundError(f"{folder / (name + '.py')}: metric module missing; shipped ones: "
                                f"{', '.join(sorted(p.name for p in METRICS_DIR.iterdir()))}")
    return evaluate.load(str(folder))


def bootstrap_difference(first_runs, second_runs, statistic=np.mean, num_samples=1000, seed=0, confidence=0.95):
    """95% interval (the size of an effect) for statistic(second) - statistic(first): {"ci95": [low, high]}.
    Whether there is an effect at all is `toolkit.statistics`' permutation test, which holds its level.

    `first_runs` and `second_runs` hold one per-example array per fine-tuning seed, over the
    same examples (rows may be tuples, e.g. (nll, characters) for bits per character with a
    ratio statistic); run k of each model used the same seed. Each bootstrap sample draws
    seeds and examples with replacement, and the figure is the mean over the drawn seeds of
    the per-seed difference over the drawn examples: the interval covers both the noise of
    fine-tuning and that of the question sample. Deterministic for a given seed.
    """
    first, second = paired_runs(first_runs, second_runs)
    size = len(first[0])
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, len(first), size=(num_samples, len(first)))
    examples = rng.integers(0, size, size=(num_samples, size))
    differences = np.array([
        np.mean([statistic(second[k][rows]) - statistic(first[k][rows]) for k in drawn])
        for drawn, rows in zip(seeds, examples)
    ])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return {"ci95": [float(low), float(high)]}


def paired_bootstrap(first, second, statistic=np.mean, num_samples=1000, seed=0, confidence=0.95):
    """Interval for statistic(second) - statistic(first) over the examples of one run each."""
    low, high = bootstrap_difference([first], [second], statistic, num_samples, seed, confidence)["ci95"]
    return low, high


def holm_adjust(p_values):
    """Holm's step-down adjusted p-values (same order as given): a difference survives the
    correction across the family at level alpha when its adjusted p-value is below alpha."""
    order = np.argsort(p_values, kind="stable")
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def ratio_of_sums(rows):
    """Bits per character of resampled (nll_nats, characters) rows."""
    rows = np.asarray(rows)
    return rows[:, 0].sum() / math.log(2) / rows[:, 1].sum()


def balanced_accuracy_of_rows(rows):
    """Balanced accuracy (mean recall over classes) of (gold, predicted) rows, as the JGLUE
    task YAMLs aggregate `balanced_acc` (scikit-learn's, like lm-eval's own f1 / mcc)."""
    from sklearn.metrics import balanced_accuracy_score

    rows = np.asarray(rows)
    return float(balanced_accuracy_score(rows[:, 0], rows[:, 1]))


def macro_f1_of_rows(rows):
    """Macro-averaged F1 of (gold, predicted) rows (`macro_f1` of the JGLUE task YAMLs)."""
    from sklearn.metrics import f1_score

    rows = np.asarray(rows)
    return float(f1_score(rows[:, 0], rows[:, 1], average="macro"))


# lm-eval metrics whose figure is computed over all questions at once from per-question
# (gold, predicted) rows, not a mean of per-question values: the statistic the paired
# resampling applies to the drawn rows.
CORPUS_METRICS = {"balanced_acc": balanced_accuracy_of_rows, "macro_f1": macro_f1_of_rows}


@functools.lru_cache(maxsize=4)
def lm_eval_task_manager(include_path=None, include_defaults=True):
    """lm-eval's TaskManager, once per process: indexing lm-eval's ~10k task YAMLs takes
    seconds, and the contamination report and the evaluation both need it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)


def lm_eval_task_manager_for(names, include_path=None):
    """The TaskManager that knows `names`: the local YAMLs alone when they hold them all (no
    need to index lm-eval's own tasks), else lm-eval's tasks plus the local ones."""
    if include_path:
        local = lm_eval_task_manager(str(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return lm_eval_task_manager(str(include_path) if include_path else None)


def lm_eval_primary_metrics(configs):
    """{task: the metric its YAML declares primary (`metadata.primary_metric`)}."""
    return {task: (config.get("metadata") or {}).get("primary_metric") for task, config in configs.items()
            if (config.get("metadata") or {}).get("primary_metric")}


# Where a task YAML's data files come from, at which revision: the Hub (hf://datasets/OWNER/NAME@REV/PATH)
# and GitHub (https://raw.githubusercontent.com/OWNER/NAME/REV/...). REV may be URL-quoted
# (refs%2Fconvert%2Fparquet); a URL ends at whitespace or a quote (it is found in YAML text, too).
HUB_DATASET_URL = re.compile(r"hf://datasets/(?P<repo>[^/@\s'\"]+/[^/@\s'\"]+)"
                             r"@(?P<revision>[^/\s'\"]+)/(?P<path>[^\s'\"]+)")
_DATA_SOURCES = (("hf://datasets/", HUB_DATASET_URL),
                 ("https://github.com/", re.compile(r"https://raw\.githubusercontent\.com/([^/]+/[^/]+)/([^/]+)/")))
COMMIT = re.compile(r"[0-9a-f]{40}")


class HubUnreachableError(ConnectionError):
    """The Hub could not be asked (offline mode, no network, a timeout): no answer, as opposed to
    huggingface_hub's HfHubHTTPError (RepositoryNotFoundError, RevisionNotFoundError, ...), an answer."""


@contextlib.contextmanager
def asking_the_hub():
    """Turns every failure to get an answer from the Hub into HubUnreachableError; the Hub's own
    answers (HfHubHTTPError: no such repo, revision, ...) pass through."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise HubUnreachableError(f"cannot reach the Hub ({constants.ENDPOINT}): HF_HUB_OFFLINE is set")
    try:
        yield
    except HfHubHTTPError:
        raise
    except Exception as error:  # huggingface_hub's transport errors have no public base class of their own
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise HubUnreachableError(f"cannot reach the Hub ({constants.ENDPOINT}): {reason}") from error


@functools.lru_cache(maxsize=64)
def resolve_hub_dataset_revision(repo_id, revision):
    """The commit a Hub dataset's `revision` (a branch or a ref such as refs/convert/parquet, which
    moves when the Hub converts the dataset again) points to now, as the Hub answers; once per
    process. Raises HubUnreachableError without an answer, HfHubHTTPError when the Hub says no."""
    from huggingface_hub import HfApi

    with asking_the_hub():
        return HfApi().dataset_info(repo_id, revision=revision).sha


def hub_dataset_commit(repo_id, revision):
    """`resolve_hub_dataset_revision` for a report: None offline or unresolvable (logged)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return resolve_hub_dataset_revision(repo_id, revision)
    except Exception as error:  # network, auth, a renamed repo: the report records "unknown", it must not fail
        logger.warning("could not resolve hf://datasets/%s@%s to a commit: %s", repo_id, revision, error)
        return None


def lm_eval_data_revisions(configs):
    """{task: [{"source", "revision" (as the YAML names it), "commit"}]} for every task whose data
    files are on the Hub or GitHub: the commit is the revision itself when the YAML pins one (40
    hex digits), else what the Hub resolves the ref to when this runs (None offline)."""
    from urllib.parse import unquote

    revisions = {}
    for task, config in configs.items():
        files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
        urls = files.values() if isinstance(files, dict) else files if isinstance(files, list) else [files]
        found = {}
        for url in (u for value in urls for u in (value if isinstance(value, list) else [value])):
            for source, pattern in _DATA_SOURCES:
                match = pattern.match(str(url))
                if match:
                    repo_id, revision = match[1], unquote(match[2])
                    pinned = COMMIT.fullmatch(revision)
                    commit = revision if pinned else (hub_dataset_commit(repo_id, revision)
                                                      if source.startswith("hf://") else None)
                    found[(source + repo_id, revision)] = commit
        if found:
            revisions[task] = [{"source": source, "revision": revision, "commit": commit}
                               for (source, revision), commit in found.items()]
    return revisions


def _sample_value(value):
    """A logged per-question value: a number, a row such as (gold, predicted), or None when it
    is not numeric (e.g. XL-Sum's (reference, summary) pairs that only lm-eval aggregates)."""
    try:
        return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else float(value)
    except (TypeError, ValueError):
        return None


def lm_eval_tasks(model, tokenizer, tasks, include_path=None, limit=None, num_fewshot=None, batch_size=4,
                  samples=False):
    """Run lm-evaluation-harness tasks on an in-memory model.

    `tasks` are lm-eval task or group names (e.g. the JGLUE tasks of `japanese_leaderboard`:
    ja_leaderboard_jcommonsenseqa, ja_leaderboard_jnli, ja_leaderboard_marc_ja,
    ja_leaderboard_jsquad, which download their data from the Hub) or local tasks found
    under `include_path` (a folder of task YAML files). Returns {"results": lm-eval's
    aggregate results} and, with `samples=True`, "samples": {task: {metric: [per-question
    values in doc_id order]}} for paired comparisons (a value is a number, or a (gold,
    predicted) row for the CORPUS_METRICS), "primary": {task: the metric its YAML
    declares primary}, and "data_revisions": {task: [{"source", "revision", "commit"}]} (the
    commit of a moving ref such as refs/convert/parquet as the Hub resolves it; None offline). lm-eval's own tasks are indexed only when a name is not found locally.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = lm_eval_task_manager_for(tasks, include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        log_samples=samples, bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        fewshot_random_seed=0,
    )
    result = {"results": output["results"], "primary": lm_eval_primary_metrics(output.get("configs", {})),
              "data_revisions": lm_eval_data_revisions(output.get("configs", {}))}
    if samples:
        result["samples"] = {}
        for task, logged in output["samples"].items():
            metrics = [m for m in output["results"][task] if "," in m and "stderr" not in m]
            ordered = sorted(logged, key=lambda sample: sample["doc_id"])
            values = {metric.split(",")[0]: [_sample_value(sample[metric.split(",")[0]]) for sample in ordered]
                      for metric in metrics if metric.split(",")[0] in ordered[0]}
            # a metric without numeric per-question values stays in "results" only
            result["samples"][task] = {metric: rows for metric, rows in values.items() if None not in rows}
    return result
