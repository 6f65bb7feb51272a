"""Chat-format records: reading, rendering with a chat template, and loss masks.

Used by `finetune.py` (training on assistant tokens only) and `evaluate_ablation.py`
(prompts rendered exactly as in fine-tuning).

Record format (JSONL, one per line), as in most SFT sets on the Hub:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

Roles are `system`, `user`, `assistant`; there is at least one assistant message and
the last message is the assistant's. Anything else raises `ChatFormatError` naming the
file, the line and the problem.

Chat template: the tokenizer's own (`tokenizer.chat_template`) when it has one. A base
model without one (Mistral-7B-v0.1, Llama-2 base) gets `DEFAULT_CHAT_TEMPLATE`, the
Mistral-Instruct format `<s>[INST] question [/INST] answer</s>` written with the
tokenizer's own BOS/EOS, so an instruct-tuned model later looks familiar to users.
`finetune.py --chat_template default` forces it for every base, which makes the
prompts identical when the bases' own templates differ.

Its generation prompt ends at "[/INST]", where every tokenizer agrees on the tokens; the
space before the answer belongs to the answer. (Ending the prompt with that space, as
many templates do, leaves a bare "▁" token in the context of a SentencePiece model, while
in training the answer's first token was mostly a merged "▁X": an extended vocabulary
merges far more of them, so that prompt handicaps the extended model.) The loss covers
everything after the generation prompt, separator included, so the model learns to write
exactly what it is asked to write at generation time.

Long chats are cut in the middle of the prompt (`cut_middle`), not dropped.

Message contents are data: a user or an answer that spells "</s>" or "<|im_end|>" gets the
tokens of those characters, never the special token (`encode_rendered`); special tokens are
parsed only where the template itself wrote them.

Loss mask: labels are -100 everywhere except on the tokens of each assistant turn (from
the end of the generation prompt to the end of the message's content) and the EOS token
that closes it. If the template does not put EOS right after
an answer, one is inserted: every answer ends with EOS, so the model learns to stop.
"""

import json
import re
from pathlib import Path

from toolkit.corpus import CorpusError, expand_paths

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


class ChatFormatError(CorpusError):
    """A malformed chat record, with the file and line that hold it."""


def check_messages(messages, where):
    """Raise ChatFormatError (prefixed with `where`) unless `messages` is a valid chat."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) < {"role", "content"}:
            raise ChatFormatError(f"{where}: message {index} needs 'role' and 'content'")
        if message["role"] not in ROLES:
            raise ChatFormatError(f"{where}: message {index} has role {message['role']!r}; use one of {ROLES}")
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise ChatFormatError(f"{where}: message {index} ({message['role']}) has empty or non-string content")
    if messages[-1]["role"] != "assistant":
        raise ChatFormatError(f"{where}: the last message must be the assistant's answer")


def read_chat_records(patterns):
    """All chats of the given JSONL files as lists of messages; errors name file and line."""
    chats = []
    for path in expand_paths(patterns):
        lines = 0
        with open(path, encoding="utf-8") as stream:
            for line_number, line in enumerate(stream, start=1):
                lines += 1
                where = f"{path}:{line_number}"
                if not line.strip():
                    raise ChatFormatError(f"{where}: blank line (remove it)")
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ChatFormatError(f"{where}: malformed JSON ({error.msg}, column {error.colno})") from error
                if not isinstance(record, dict) or "messages" not in record:
                    raise ChatFormatError(f"{where}: a JSON object with a 'messages' list is expected")
                check_messages(record["messages"], where)
                chats.append(record["messages"])
        if lines == 0:
            raise ChatFormatError(f"{path}: the file is empty")
    return chats


def require_eos(tokenizer, name=None):
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"{name or tokenizer.name_or_path}: the tokenizer has no EOS token, so a fine-tuned model could not "
            "learn to stop; set `eos_token` in its tokenizer_config.json"
        )
    return tokenizer.eos_token_id


def chat_template(tokenizer, choice="auto"):
    """The template to use: 'auto' (the tokenizer's, else the default), 'default', or a .jinja path."""
    if choice == "auto":
        return tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    if choice == "default":
        return DEFAULT_CHAT_TEMPLATE
    return Path(choice).read_text(encoding="utf-8")


def render(tokenizer, messages, template, add_generation_prompt=False):
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def special_token_pattern(tokenizer):
    """A regex matching any special-token string of `tokenizer` (longest first)."""
    specials = set(tokenizer.all_special_tokens)
    specials |= {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return re.compile("|".join(re.escape(token) for token in sorted(specials, key=len, reverse=True) if token))


def encode_rendered(tokenizer, text, data_spans):
    """Token ids and character offsets of a rendered chat.

    Special-token strings become special tokens only outside `data_spans` (the character
    spans of message contents); inside them they are text. The text between two template
    special tokens is tokenised as a piece, which is what the tokenizer does anyway (added
    tokens split the text before its pre-tokenizer runs), so a chat without special-token
    strings in its contents gets exactly the ids of `tokenizer(text)`.
    """
    cuts = [match.span() for match in special_token_pattern(tokenizer).finditer(text)
            if not any(start < match.end() and match.start() < end for start, end in data_spans)]
    ids, offsets, position = [], [], 0
    for start, end in cuts + [(len(text), len(text))]:
        if start > position:
            piece = tokenizer(text[position:start], add_special_tokens=False, split_special_tokens=True,
                              return_offsets_mapping=True)
            ids += piece["input_ids"]
            offsets += [(a + position, b + position) for a, b in piece["offset_mapping"]]
        if end > start:
            ids.append(tokenizer.convert_tokens_to_ids(text[start:end]))
            offsets.append((start, end))
        position = end
    return ids, offsets


def content_spans(text, messages):
    """Character spans of each message's content in the rendered `text`, in order."""
    spans, cursor = [], 0
    for message in messages:
        start = text.find(message["content"], cursor)
        if start < 0:
            raise ValueError("the chat template does not copy messages verbatim; pass --chat_template default")
        spans.append((start, start + len(message["content"])))
        cursor = start + len(message["content"])
    return spans


def encode_prompt(tokenizer, user_content, template):
    """Token ids of `prompt_text`, the user's content read as text."""
    text = prompt_text(tokenizer, user_content, template)
    return encode_rendered(tokenizer, text, content_spans(text, [{"content": user_content}]))[0]


def prompt_text(tokenizer, user_content, template):
    """The text a model sees before its answer to one user message."""
    return render(tokenizer, [{"role": "user", "content": user_content}], template, add_generation_prompt=True)


def answer_text(tokenizer, user_content, answer, template):
    """What a model must write after `prompt_text` to give `answer`: the answer with the
    template's separator in front (" answer" for the default template)."""
    prompt = prompt_text(tokenizer, user_content, template)
    _, spans = assistant_spans(tokenizer, [{"role": "user", "content": user_content},
                                           {"role": "assistant", "content": answer}], template)
    return render(tokenizer, [{"role": "user", "content": user_content}, {"role": "assistant", "content": answer}],
                  template)[len(prompt):spans[0][1]]


def assistant_spans(tokenizer, messages, template):
    """The rendered chat and, per assistant message, the character span the model writes:
    from the end of the generation prompt before it to the end of its content."""
    text = render(tokenizer, messages, template)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:index], template, add_generation_prompt=True)
        follows_prompt = text.startswith(prefix)
        start = text.find(message["content"], len(prefix) if follows_prompt else 0)
        if start < 0:
            raise ValueError("the chat template does not copy assistant messages verbatim; pass --chat_template default")
        # the separator between the generation prompt and the content is part of the answer
        first = len(prefix) if follows_prompt and not text[len(prefix):start].strip() else start
        spans.append((first, start + len(message["content"])))
    return text, spans


def tokenize_chat(tokenizer, messages, template, max_length=None):
    """input_ids and labels (-100 outside answers) for one chat; each answer ends with EOS."""
    eos = require_eos(tokenizer)
    text, spans = assistant_spans(tokenizer, messages, template)
    token_ids, offsets = encode_rendered(tokenizer, text, content_spans(text, messages))
    input_ids, labels = [], []
    open_answer = None  # index of the answer whose tokens were just labelled, until EOS closes it
    for token, (start, end) in zip(token_ids, offsets):
        answer = next((k for k, (a, b) in enumerate(spans) if start < b and end > a), None)
        if open_answer is not None and answer != open_answer:
            open_answer = None
            if token == eos:  # the template's own EOS after the answer: learn it
                input_ids.append(token)
                labels.append(token)
                continue
            input_ids.append(eos)  # the template leaves the answer open: close it with EOS
            labels.append(eos)
        input_ids.append(token)
        labels.append(token if answer is not None else IGNORE_INDEX)
        open_answer = answer
    if open_answer is not None:
        input_ids.append(eos)
        labels.append(eos)
    if max_length is not None and len(input_ids) > max_length:
        input_ids, labels = cut_middle(input_ids, labels, max_length)
    return {"input_ids": input_ids, "labels": labels}


def answer_characters(tokenizer, labels) -> int:
    """Characters of the answer text behind `labels` (EOS and other special tokens count none): the
    denominator that makes a fine-tuning loss comparable across tokenizers (nats per character)."""
    answer = [label for label in labels if label != IGNORE_INDEX]
    return len(tokenizer.decode(answer, skip_special_tokens=True)) if answer else 0


def cut_middle(input_ids, labels, max_length):
    """Shorten a chat to `max_length` tokens without losing its answers when they fit.

    Keeps the start (system prompt, the instruction at the head of the user message: at
    most a quarter of the budget) and the end (the rest of the prompt and the answers);
    the middle of the prompt goes. So every chat stays in the data for every tokenizer:
    a base whose tokenizer needs more tokens sees less of the passage, not fewer records.
    If the answers alone do not fit, the chat is cut at the end instead.
    """
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    head = min(max_length // 4, first)
    tail = max_length - head
    if len(input_ids) - first > tail:
        return input_ids[:max_length], labels[:max_length]
    return input_ids[:head] + input_ids[-tail:], labels[:head] + labels[-tail:]
