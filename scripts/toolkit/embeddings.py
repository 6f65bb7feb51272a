"""Give a base model rows for the tokens an extended tokenizer adds.

    check_extension(base_tokenizer, tokenizer, model, name=...)     ValueError unless `tokenizer` keeps every
                                                                  base token at its base id and the model has
                                                                  a row for every base id
    decompose_new_tokens(base_tokenizer, tokenizer) -> {new id: [base ids]}
    extend_embeddings(model, tokenizer, base_tokenizer, init="subword_mean", pad_to_multiple_of=64) -> report

What it relies on, and nothing else: new tokens have ids >= len(base_tokenizer), and the
base tokenizer can encode each new token's string. A token of the tokenizer's model
vocabulary (a new BPE merge such as "▁東京" or byte-level "æĿ±äº¬") is split by the base
tokenizer's own model, in the same pre-tokenized form, so a SentencePiece word-start
marker stays a word-start marker; an added token (`tokenizer.add_tokens`) is encoded from
its text, without a leading lone space piece the base tokenizer may prepend.

Inits (`--embedding_init`):
- subword_mean: each new row is the mean of the base model's rows for the token's base
  decomposition, in the input embedding and, separately, in an untied LM head (a tied
  head shares the input matrix, so it is set once). The model then starts where the base
  model was for those characters.
- hf_mean: transformers' `resize_token_embeddings(mean_resizing=True)`: every new row is
  (a draw very close to) the mean of all old rows.
- random: transformers' own initialiser (normal, std = config.initializer_range).
Padding rows (to a multiple of `pad_to_multiple_of`, for matmul efficiency) never occur in
the data; they get the hf_mean init under every choice.

ZeRO-3: call this before `accelerator.prepare`. The GPU configs load under `zero3_init_flag:
true` (deepspeed.zero.Init: each process holds only its partition of the body), but under
transformers 5.23 `resize_token_embeddings` creates the new input and output matrices as full
tensors on every process, outside the partitioning: the init then writes full tensors (the
`_gathered` context finds nothing partitioned and does nothing; it is kept for a model whose
matrices are partitioned), and DeepSpeed partitions the two matrices at `accelerator.prepare`,
broadcasting them from rank 0 (~5 GiB per GPU at load for 120k x 4096 in bf16, then freed).
Tested: the multi-node config on two local "machines". With `zero3_init_flag: false` (the CPU
test config) the model is a plain full model on every process until `accelerator.prepare`
partitions it.

    NewEmbeddingsOnlyStage(model, first_new_row, steps)   EEVE's first stage: only new rows learn
"""

import contextlib
import math

import torch

INITS = ("subword_mean", "hf_mean", "random")


def check_extension(base_tokenizer, tokenizer, model=None, name="tokenizer", base_name="base tokenizer"):
    """Raise ValueError naming the first base token whose id `tokenizer` changes."""
    base_vocab, vocab = base_tokenizer.get_vocab(), tokenizer.get_vocab()
    if len(tokenizer) < len(base_tokenizer):
        raise ValueError(
            f"{name} has {len(tokenizer)} tokens, fewer than the {len(base_tokenizer)} of the {base_name}: "
            "it is not an extension of the model's tokenizer (extend it with scripts/extend_tokenizer.py)"
        )
    for token, index in sorted(base_vocab.items(), key=lambda item: item[1]):
        if vocab.get(token) != index:
            raise ValueError(
                f"{name} is not an extension of the {base_name}: base token {token!r} has id {index} there but "
                f"{vocab.get(token)} here. Build the extended tokenizer from this model's tokenizer "
                "(scripts/extend_tokenizer.py --base_tokenizer <the model>)."
            )
    if model is not None:
        rows = embedding_rows(model.get_input_embeddings().weight)
        if rows < len(base_tokenizer):
            raise ValueError(
                f"the model has {rows} embedding rows but its {base_name} has {len(base_tokenizer)} tokens: "
                "tokenizer and model do not belong together"
            )


def embedding_rows(weight) -> int:
    """Rows of an embedding matrix, also when ZeRO-3 has partitioned it (shape then reads 0)."""
    return weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]


def _decompose_text(base_tokenizer, text):
    ids = base_tokenizer(text, add_special_tokens=False)["input_ids"]
    # SentencePiece-style tokenizers prepend a word-start marker that may become its own piece.
    while len(ids) > 1 and not text[:1].isspace() and not base_tokenizer.decode([ids[0]]).strip():
        ids = ids[1:]
    return ids


def decompose_new_tokens(base_tokenizer, tokenizer) -> dict:
    """{new token id: base token ids} for every id in [len(base_tokenizer), len(tokenizer))."""
    base_size = len(base_tokenizer)
    base_model = base_tokenizer.backend_tokenizer.model
    base_vocab = base_tokenizer.get_vocab()
    added = tokenizer.added_tokens_decoder
    decompositions = {}
    for index in range(base_size, len(tokenizer)):
        if index in added:
            decompositions[index] = _decompose_text(base_tokenizer, added[index].content)
            continue
        piece = tokenizer.convert_ids_to_tokens(index)
        parts = [base_vocab.get(part.value) for part in base_model.tokenize(piece)]
        if parts and all(part is not None and part < base_size for part in parts):
            decompositions[index] = parts
        else:  # the base model cannot split the raw piece: go through text
            decompositions[index] = _decompose_text(base_tokenizer, tokenizer.convert_tokens_to_string([piece]))
    return decompositions


@contextlib.contextmanager
def _gathered(parameters):
    """Full tensors for ZeRO-3-partitioned parameters (written back from rank 0); else nothing."""
    parameters = [p for p in parameters if p is not None]
    if any(hasattr(p, "ds_id") for p in parameters):
        import deepspeed

        with deepspeed.zero.GatheredParameters(parameters, modifier_rank=0):
            yield
    else:
        yield


def _set_subword_means(weight, decompositions, fallback_rows):
    with torch.no_grad():
        source = weight.detach().float()
        for index, parts in decompositions.items():
            if parts:
                weight[index] = source[parts].mean(dim=0).to(weight.dtype)
            else:
                weight[index] = fallback_rows.to(weight.dtype)


def extend_embeddings(model, tokenizer, base_tokenizer, init="subword_mean", pad_to_multiple_of=64) -> dict:
    """Resize input and output embeddings for `tokenizer` and initialise the new rows; a report."""
    if init not in INITS:
        raise ValueError(f"--embedding_init must be one of {', '.join(INITS)}, not {init!r}")
    check_extension(base_tokenizer, tokenizer, model)
    input_embeddings = model.get_input_embeddings()
    old_rows = embedding_rows(input_embeddings.weight)
    target = max(old_rows, math.ceil(len(tokenizer) / pad_to_multiple_of) * pad_to_multiple_of)
    decompositions = decompose_new_tokens(base_tokenizer, tokenizer)
    if target != old_rows:
        model.resize_token_embeddings(target, mean_resizing=(init != "random"))
    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings()
    tied = output_embeddings is None or output_embeddings.weight is input_embeddings.weight
    if init == "subword_mean" and decompositions:
        matrices = [input_embeddings.weight] + ([] if tied else [output_embeddings.weight])
        for weight in matrices:
            with _gathered([weight]):
                fallback = weight.detach()[: len(base_tokenizer)].float().mean(dim=0)
                _set_subword_means(weight, decompositions, fallback)
    lengths = [len(parts) for parts in decompositions.values()]
    examples = list(decompositions.items())[:5]
    return {
        "embedding_init": init,
        "base_tokens": len(base_tokenizer),
        "tokenizer_tokens": len(tokenizer),
        "new_tokens": len(decompositions),
        "embedding_rows_before": old_rows,
        "embedding_rows_after": target,
        "pad_to_multiple_of": pad_to_multiple_of,
        "tied_embeddings": tied,
        "mean_base_pieces_per_new_token": sum(lengths) / len(lengths) if lengths else 0.0,
        "new_tokens_without_decomposition": sum(1 for n in lengths if n == 0),
        "examples": [
            {"token": tokenizer.convert_ids_to_tokens(index), "base_pieces": base_tokenizer.convert_ids_to_tokens(parts)}
            for index, parts in examples
        ],
    }


class NewEmbeddingsOnlyStage:
    """EEVE's first stage (Kim et al. 2024): for `steps` optimizer steps only the new embedding rows learn.

    While active, every parameter but the input/output embedding matrices has requires_grad=False (their
    weight gradients are not computed: backward only carries activations' gradients down to the
    embeddings), and a gradient hook zeroes the rows of the base vocabulary (ids < `first_new_row`), so
    old rows get no update (embeddings have no weight decay, so a zero gradient means no change under
    AdamW). From step `steps` on, everything trains; the body's learning rate warms up again
    (`toolkit.training.make_scheduler`). ZeRO-3 safe: DeepSpeed gives a parameter without a gradient a
    zero gradient partition, and the hook sees the gathered full-shape gradient.

    `stage(step)` is called before each optimizer step (`training.train(..., before_step=stage)`).
    """

    def __init__(self, model, first_new_row: int, steps: int):
        self.model, self.first_new_row, self.steps = model, first_new_row, steps
        embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
        self.embedding_weights = {id(m.weight): m.weight for m in embeddings if m is not None}
        self.body = [p for p in model.parameters() if id(p) not in self.embedding_weights and p.requires_grad]
        self.active = None
        for weight in self.embedding_weights.values():
            weight.register_hook(self._mask_old_rows)

    def _mask_old_rows(self, grad):
        if not self.active:
            return grad
        grad = grad.clone()
        grad[: self.first_new_row] = 0
        return grad

    def __call__(self, step: int):
        active = step < self.steps
        if active != self.active:
            for parameter in self.body:
                parameter.requires_grad_(not active)
            self.active = active
