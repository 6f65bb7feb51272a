"""Evaluation building blocks for the fine-tuned ablation (`evaluate_ablation.py`).

- Task files: JSONL, one question per line. Multiple choice: `{"id", "prompt", "choices",
  "label"}`; generation: `{"id", "prompt", "reference"}` (see `sample_data/tasks/README.md`).
- Multiple choice is scored by log-likelihood of each choice after the chat-rendered
  prompt, divided by the choice's length in characters: comparable across tokenizers
  (a per-token average would favour a tokenizer that cuts the answer into more pieces).
- Generation: greedy decoding up to a token budget; whether it stopped with EOS; metrics
  through `evaluate` modules shipped in `metrics/` and loaded by path (offline).
- Paired bootstrap over examples for the difference between two models, seeded.
- lm-evaluation-harness through its Python API on an in-memory model.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.chat import prompt_text
from toolkit.corpus import CorpusError, iter_records

REPO_ROOT = Path(__file__).resolve().parents[2]
METRICS_DIR = REPO_ROOT / "metrics"


class TaskError(CorpusError):
    """A malformed task file, with the file and line at fault."""


@dataclass
class Task:
    name: str
    kind: str  # "multiple_choice" or "generation"
    path: str
    examples: list


def read_task(path, max_examples=None):
    """One task file; the kind follows from its records. Errors name file and line."""
    path = Path(path)
    examples, kind = [], None
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
            examples.append(record)
    except CorpusError as error:
        raise TaskError(str(error).replace("pass --skip_bad_records to count and skip such lines", "fix or remove it")) from error
    if not examples:
        raise TaskError(f"{path}: no task records")
    return Task(path.stem, kind, str(path), examples[:max_examples] if max_examples else examples)


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
def continuation_logprobs(model, tokenizer, context, continuations):
    """Summed log-probability of each continuation after `context`.

    The text context + continuation is tokenised whole (as the model sees it) and the
    tokens that cover any continuation character are scored, so no tokenizer-specific
    boundary handling (SentencePiece's leading "▁", byte-level BPE merges) is needed.
    The token prefix shared by all options runs once; its KV cache is repeated for a
    padded batch of the options' remaining tokens.
    """
    sequences, first_scored = [], []
    for continuation in continuations:
        encoding = tokenizer(context + continuation, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        first = next(i for i, (_, end) in enumerate(encoding["offset_mapping"]) if end > len(context))
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
    """Index of the choice with the highest log-likelihood per character, and the scores."""
    context = prompt_text(tokenizer, example["prompt"], template)
    logprobs = continuation_logprobs(model, tokenizer, context, example["choices"])
    per_character = [lp / max(len(choice), 1) for lp, choice in zip(logprobs, example["choices"])]
    return int(np.argmax(per_character)), per_character


@torch.no_grad()
def generate_answers(model, tokenizer, template, prompts, max_new_tokens, batch_size=8):
    """Greedy answers, batched with left padding: [(text, stopped with EOS?, new tokens)]."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    answers = []
    for first in range(0, len(prompts), batch_size):
        contexts = [tokenizer(prompt_text(tokenizer, p, template), add_special_tokens=False)["input_ids"]
                    for p in prompts[first:first + batch_size]]
        width = max(map(len, contexts))
        ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, context in enumerate(contexts):
            ids[row, width - len(context):] = torch.tensor(context)
            mask[row, width - len(context):] = 1
        output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=eos, pad_token_id=pad)
        for row in output[:, width:].tolist():
            stopped = eos in row
            new = row[: row.index(eos)] if stopped else row
            answers.append((tokenizer.decode(new, skip_special_tokens=True).strip(), stopped, len(new)))
    return answers


def load_metric(name):
    """An `evaluate` metric module shipped in `metrics/<name>/`, loaded by path (no Hub)."""
    import evaluate

    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        raise FileNotFoundError(f"{folder / (name + '.py')}: metric module missing; shipped ones: "
                                f"{', '.join(sorted(p.name for p in METRICS_DIR.iterdir()))}")
    return evaluate.load(str(folder))


def paired_bootstrap(first, second, statistic=np.mean, num_samples=1000, seed=0, confidence=0.95):
    """Interval for statistic(second) - statistic(first), resampling examples jointly.

    `first` and `second` are per-example arrays over the same examples (rows may be
    tuples, e.g. (nll, characters) for bits per character with a ratio statistic).
    Deterministic for a given seed.
    """
    first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if len(first) != len(second) or len(first) == 0:
        raise ValueError("paired bootstrap needs two non-empty arrays over the same examples")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(first), size=(num_samples, len(first)))
    differences = np.array([statistic(second[rows]) - statistic(first[rows]) for rows in indices])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return float(low), float(high)


def ratio_of_sums(rows):
    """Bits per character of resampled (nll_nats, characters) rows."""
    rows = np.asarray(rows)
    return rows[:, 0].sum() / math.log(2) / rows[:, 1].sum()


def lm_eval_tasks(model, tokenizer, tasks, include_path=None, limit=None, num_fewshot=None, batch_size=4,
                  samples=False):
    """Run lm-evaluation-harness tasks on an in-memory model.

    `tasks` are lm-eval task or group names (e.g. the JGLUE tasks of `japanese_leaderboard`:
    ja_leaderboard_jcommonsenseqa, ja_leaderboard_jnli, ja_leaderboard_marc_ja,
    ja_leaderboard_jsquad, which download their data from the Hub) or local tasks found
    under `include_path` (a folder of task YAML files). Returns {"results": lm-eval's
    aggregate results} and, with `samples=True`, "samples": {task: {metric: [per-question
    values in doc_id order]}} for paired comparisons.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        log_samples=samples, bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        fewshot_random_seed=0,
    )
    result = {"results": output["results"]}
    if samples:
        result["samples"] = {}
        for task, logged in output["samples"].items():
            metrics = [m for m in output["results"][task] if "," in m and "stderr" not in m]
            ordered = sorted(logged, key=lambda sample: sample["doc_id"])
            result["samples"][task] = {
                metric.split(",")[0]: [float(sample[metric.split(",")[0]]) for sample in ordered]
                for metric in metrics if metric.split(",")[0] in ordered[0]
            }
    return result
