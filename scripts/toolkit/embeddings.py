"""Give a base model rows for the tokens an extended tokenizer adds.

    check_extension(base_tokenizer, tokenizer, model, name=...)     ValueError unless `tokenizer` keeps every
                                                                  base token at its base id and the model has
                                                                  a row for every base id
    decompose_new_tokens(base_tokenizer, tokenizer) -> {new id: [base ids]}
    extend_embeddings(model, tokenizer, base_tokenizer, init="subword_mean", pad_to_multiple_of=64,
                      contexts=None, fit=FitSettings()) -> report
    mine_contexts(token_dir, window=64, max_tokens=8192, seed=0) -> LongTensor [contexts, window]

What it relies on, and nothing else: new tokens have ids >= len(base_tokenizer), and the
base tokenizer can encode each new token's string. A token of the tokenizer's model
vocabulary (a new BPE merge such as "▁東京" or byte-level "æĿ±äº¬") is split by the base
tokenizer's own model, in the same pre-tokenized form, so a SentencePiece word-start
marker stays a word-start marker; an added token (`tokenizer.add_tokens`) is encoded from
its text, without a leading lone space piece the base tokenizer may prepend.

Inits (`--embedding_init`), measured side by side in benchmarks/bench_embedding_init.py:
- distill: data-aware, from contexts of the training token shards (`mine_contexts`),
  starting from subword_mean, the model's body frozen. Input rows by token distillation (Dobler,
  Elliott, de Melo, arXiv 2505.20133): a new token's row is optimised so that the hidden states the
  model computes over a context written with the new tokens match, position by position, those the
  base model computes over the same text written with its base pieces (each extended position is
  aligned with the base position of its token's last piece); the hidden states after
  `target_layer` layers are compared (the paper's `target_layer`), so a step runs only those. Output
  rows are fitted to the base model's own final hidden states at those positions (computed once):
  the cross-entropy of the next extended token over the whole vocabulary, base rows fixed. Free
  per-token output rows memorise their few contexts (held-out bits/char worse than subword_mean,
  BENCHMARKS.md), so a new output row is a weighted sum of its base pieces' output rows plus a logit
  offset, the weights and offset shared by all tokens with the same number of pieces (8 x 9
  numbers): it starts at subword_mean and serves tokens seen in no context too. A tied head has one
  row: it is that output row plus a per-token distilled correction (regularised towards 0). A new
  token that occurs in no context keeps its subword_mean input row (counted in the report).
- offset_fit: subword_mean input rows; each new output row is its subword_mean row plus b_t * v.
  v is a "bias direction": the ridge regression of the constant 1 on the extended model's own final
  hidden states h (subword_mean inputs, body frozen, one forward pass over the contexts; h.v ~ 1), so
  b_t acts as a per-token logit offset. b_t = m[number of pieces of t] + d_t is fitted by full-batch
  L-BFGS (convex) to the cross-entropy of the next extended token over the whole vocabulary, base
  rows fixed, with an L2 pull on d_t (`offset_pull`); a token seen in no context gets m[its count].
  Few free numbers per token: it does not memorise its contexts the way free rows do. A tied head:
  the same row is the input row too (measured in BENCHMARKS.md). No backward pass through the body.
- piece_fit: offset_fit with a better start for the output rows. Instead of the plain mean of its
  pieces' output rows, a new token's output row is w_first * (first piece's row) + w_middle * (mean of
  the middle pieces' rows) + w_last * (last piece's row), the three weights shared by all tokens with
  the same number of pieces (8 or more together: 27 numbers). Its logit is linear in the weights, so
  the fit is convex too; it starts at subword_mean's weights (1/k, (k-2)/k, 1/k) and runs first, by
  L-BFGS on a fixed draw of `piece_weight_positions` positions (with a logit offset per number of
  pieces); then the offsets b_t are fitted on every position exactly as in offset_fit, from those
  weighted rows. On byte-level Japanese the first piece's row carries most of the weight (what comes
  next starts with it). Cost: offset_fit's plus the first stage (~20 s at demo size). A tied head
  keeps subword_mean's weights (the row would also move the token's input, which measured worse), so
  there piece_fit gives offset_fit's rows, and says so in its report.
All three run on every process before `accelerator.prepare` (`fit_new_rows`): contexts are split over
processes, the base model's features gathered and the gradients summed, so every process ends with
the same rows; all parameters are gathered for it under zero3_init (GatheredParameters).
piece_fit is pretrain.py's default: the best init measured at step 0 (held-out JA bits/char 1.19x the
base on the untied SmolLM2, the Mistral case, against offset_fit's 1.22x and subword_mean's 1.29x; a tied
head gets offset_fit's 1.22x; EN within 0.3%; BENCHMARKS.md).
- subword_mean (the baseline, and extend_embeddings' default, which needs no contexts):
  each new row is the mean of the base model's rows for the token's base
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
    NewRowsLearningRate(model, first_new_row, multiplier)  new rows step `multiplier` x the embedding LR
"""

import contextlib
import math
import time
from dataclasses import dataclass

import torch

DATA_INITS = ("distill", "offset_fit", "piece_fit")  # need contexts from the training token shards
INITS = ("subword_mean",) + DATA_INITS + ("hf_mean", "random")
PIECE_SLOTS = 8  # output fit: weights for the first 7 pieces, the 8th holds the mean of the rest
PIECE_BUCKETS = 8  # piece_fit: piece weights per number of pieces, 8 or more together
PIECE_ROW_CHUNK = 4096  # piece_fit: new tokens whose piece rows are built at once
PIECE_LEARNING_RATE = 0.05  # Adam on the piece weights and offsets (0.5 diverges: BENCHMARKS.md)


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


def extend_embeddings(model, tokenizer, base_tokenizer, init="subword_mean", pad_to_multiple_of=64, contexts=None,
                      fit=None) -> dict:
    """Resize input and output embeddings for `tokenizer` and initialise the new rows; a report.

    `contexts` (LongTensor [n, window] of extended-tokenizer ids, `mine_contexts`) are needed by the
    data-aware inits (DATA_INITS); `fit` (FitSettings) sets their budget."""
    if init not in INITS:
        raise ValueError(f"--embedding_init must be one of {', '.join(INITS)}, not {init!r}")
    if init in DATA_INITS and contexts is None:
        raise ValueError(f"--embedding_init {init} needs contexts from the training token shards (mine_contexts)")
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
    if init in ("subword_mean",) + DATA_INITS and decompositions:
        matrices = [input_embeddings.weight] + ([] if tied else [output_embeddings.weight])
        for weight in matrices:
            with _gathered([weight]):
                fallback = weight.detach()[: len(base_tokenizer)].float().mean(dim=0)
                _set_subword_means(weight, decompositions, fallback)
    fit_report = None
    if init in DATA_INITS and decompositions:
        fit_report = fit_new_rows(model, decompositions, len(base_tokenizer), contexts, method=init,
                                  settings=fit or FitSettings())
    lengths = [len(parts) for parts in decompositions.values()]
    examples = list(decompositions.items())[:5]
    return {
        "fit": fit_report,
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


# --------------------------------------------------------------------------- data-aware inits


@dataclass
class FitSettings:
    """Budget of the data-aware inits (pretrain.py's --embedding_init_* arguments)."""

    steps: int = 30  # Adam steps over all contexts at once (full batch)
    learning_rate: float = 0.1  # x the RMS of the base rows: an Adam step moves a coordinate by about this share
    target_layer: int = 4  # hidden states compared after this many layers (the paper: the last, or an early one)
    # pull towards subword_mean, worth this many contexts' cross-entropy: a row whose coordinates move by
    # the RMS of the base rows costs as much as this many nats on one position (a row fitted to its few
    # contexts otherwise memorises them)
    regularisation: float = 4.0
    fit_output: bool = True  # False: output rows stay subword_mean (untied heads; distill fits input rows only)
    offset_iterations: int = 200  # offset_fit: L-BFGS iterations (strong Wolfe line search; convex objective)
    # offset_fit: L2 pull of the per-token offsets d_t towards their piece-count offset, sum(d^2) / positions
    offset_pull: float = 1.0
    # piece_fit's first stage: the piece weights are fitted on this many positions (a fixed draw), with at
    # most this many L-BFGS iterations; the offsets are then fitted on all positions as in offset_fit
    piece_weight_positions: int = 2048
    piece_weight_iterations: int = 50


def mine_contexts(token_dir, window=64, max_tokens=8192, seed=0):
    """LongTensor [n, window]: `max_tokens // window` windows of the training token shards, drawn
    without replacement by `seed` (the same on every process)."""
    from toolkit.token_shards import TokenBlocks

    blocks = TokenBlocks(token_dir, window, per_document=False)
    count = min(len(blocks), max(1, max_tokens // window))
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:count]
    return torch.stack([blocks[int(i)]["input_ids"] for i in sorted(order.tolist())])


def _rank_and_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_gather_rows(tensor, world):
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _StopForward(Exception):
    def __init__(self, hidden):
        self.hidden = hidden


def _hidden_after(decoder, layers, **inputs):
    """Hidden states after the first `layers` decoder layers, without running the rest: a forward
    hook (public API) on layer `layers` - 1 stops the pass with its output."""

    def stop(module, args, output):
        raise _StopForward(output[0] if isinstance(output, tuple) else output)

    handle = decoder.layers[layers - 1].register_forward_hook(stop)
    try:
        decoder(**inputs)
    except _StopForward as stopped:
        return stopped.hidden
    finally:
        handle.remove()
    raise RuntimeError("the decoder finished without reaching its layer hook")


def _base_sequence(context, decompositions, base_size):
    """(base ids, index of each extended position's last piece), or None when a token has no pieces."""
    ids, ends = [], []
    for token in context.tolist():
        pieces = [token] if token < base_size else decompositions.get(token)
        if not pieces:
            return None
        ids += pieces
        ends.append(len(ids) - 1)
    return torch.tensor(ids), torch.tensor(ends)


def _next_token_cross_entropy(new_logits, base_lse, new_target, base_target_logit):
    """Mean cross-entropy of the next extended token over the whole vocabulary, the base rows fixed:
    `new_logits` [positions, new tokens]; `base_lse` the base rows' log-sum-exp at each position
    (computed once); `new_target` the target's index among the new tokens, -1 where the target is a
    base token, whose logit is then `base_target_logit`. The objective of every data-aware fit."""
    total = torch.logaddexp(base_lse, torch.logsumexp(new_logits, dim=1))
    new_target_logit = new_logits.gather(1, new_target.clamp(min=0)[:, None])[:, 0]
    return (total - torch.where(new_target >= 0, new_target_logit, base_target_logit)).mean()


def fit_new_rows(model, decompositions, base_size, contexts, method="distill", settings=None) -> dict:
    """Data-aware new rows (see the module doc), written into the model; a report.

    method: one of DATA_INITS; offset_fit and piece_fit run `_fit_logit_offsets`. Every process runs it (before
    accelerator.prepare): each computes its share of the contexts,
    features and gradients are gathered/summed over processes, so all end with the same rows (rank
    0's are written under ZeRO-3). The rows start from subword_mean (already set by the caller).
    """
    from tqdm.auto import tqdm

    settings = settings or FitSettings()
    started = time.time()
    rank, world = _rank_and_world()
    input_weight = model.get_input_embeddings().weight
    output_module = model.get_output_embeddings()
    tied = output_module is None or output_module.weight is input_weight
    parameters = list(model.parameters())
    with _gathered(parameters):
        device = input_weight.device
        rows = input_weight.shape[0]
        decoder = model.get_decoder()
        layers = max(1, min(settings.target_layer, len(decoder.layers)))
        usable, without_pieces = [], 0
        for context in contexts:
            sequence = _base_sequence(context, decompositions, base_size)
            if sequence is None:
                without_pieces += 1
            else:
                usable.append((context.to(device), *(part.to(device) for part in sequence)))
        usable = usable[: len(usable) // world * world]  # the same number on every process
        if not usable:
            return {"fallback": "subword_mean", "reason": "no usable context", "contexts": 0,
                    "contexts_with_a_token_without_pieces": without_pieces, "new_tokens_with_contexts": 0,
                    "new_tokens_without_contexts": len(decompositions), "seconds": time.time() - started}
        mine = usable[rank::world]
        if method != "distill":
            return _fit_logit_offsets(model, decompositions, base_size, mine, world, settings, started,
                                      piece_weights=(method == "piece_fit"),
                                      report={"contexts": len(usable), "context_tokens": len(usable) * contexts.shape[1],
                                              "contexts_with_a_token_without_pieces": without_pieces})
        progress = tqdm(total=len(mine) + settings.steps, desc="embedding init", unit="step",
                        disable=rank != 0)
        was_training = model.training
        model.eval()
        teacher_hidden, teacher_final = [], []
        with torch.no_grad():  # the base model over its own pieces: targets, computed once
            for context, base_ids, ends in mine:
                out = decoder(input_ids=base_ids[None], output_hidden_states=True)
                teacher_hidden.append(out.hidden_states[layers][0, ends].float())
                teacher_final.append(out.last_hidden_state[0, ends[:-1]].float())
                progress.update(1)
        teacher_hidden = torch.stack(teacher_hidden)
        ids = torch.stack([context for context, _, _ in mine])
        features = _all_gather_rows(torch.cat(teacher_final), world)  # [P, d]
        targets = _all_gather_rows(ids[:, 1:].reshape(-1), world)  # the next extended token
        output_weight = input_weight if tied else output_module.weight
        base_output = output_weight.detach()[:base_size].float()
        with torch.no_grad():  # the base rows' part of the softmax is fixed: once
            base_logits = features @ base_output.T
            base_lse = torch.logsumexp(base_logits, dim=-1)
            new_target = torch.where(targets >= base_size, targets - base_size, -1)
            base_target_logit = base_logits.gather(1, targets.clamp(max=base_size - 1)[:, None])[:, 0]
            del base_logits
        seen = torch.zeros(rows, dtype=torch.bool, device=device)
        seen[_all_gather_rows(ids.reshape(-1), world)] = True
        seen[:base_size] = False
        scale = base_output.pow(2).mean().sqrt()
        initial_output = output_weight.detach()[base_size:].float().clone()
        initial_input = input_weight.detach()[base_size:].float().clone()
        # Output rows: a weighted sum of the output rows of the token's base pieces, plus an offset of
        # its logit, with weights and offset shared by all tokens of the same number of pieces: few
        # parameters, fitted on the contexts, and they serve every new token, seen in a context or not.
        # Starts at subword_mean (equal weights, no offset). `u` turns an offset into a row: h.u ~ 1
        # for the base model's hidden states (least squares), so row + b u raises the logit by ~b.
        slots = PIECE_SLOTS
        piece_rows = torch.zeros(rows - base_size, slots, initial_output.shape[1], device=device)
        piece_count = torch.zeros(rows - base_size, dtype=torch.long, device=device)
        for index, parts in decompositions.items():
            if parts:
                head, tail = parts[: slots - 1], parts[slots - 1:]
                piece_rows[index - base_size, : len(head)] = base_output[head]
                if tail:
                    piece_rows[index - base_size, slots - 1] = base_output[tail].mean(0)
                piece_count[index - base_size] = len(parts)
        has_pieces = (piece_count > 0)[:, None]
        bucket = piece_count.clamp(1, slots) - 1
        initial_weights = torch.zeros(slots, slots, device=device)
        for k in range(1, slots + 1):
            initial_weights[k - 1, : min(k, slots - 1)] = 1.0 / k
            if k >= slots:
                initial_weights[k - 1, slots - 1] = (k - slots + 1) / k
        piece_weights = initial_weights.clone().requires_grad_(True)
        offsets = torch.zeros(slots, device=device, requires_grad=True)
        with torch.no_grad():
            gram = features.T @ features + 1e-3 * torch.eye(features.shape[1], device=device) * len(features)
            unit = torch.linalg.solve(gram, features.sum(0))  # features @ unit ~ 1
        fit_output = settings.fit_output or tied
        free_rows = tied  # a tied row is also an input row: distillation moves it per token
        row_delta = torch.zeros_like(initial_output, requires_grad=free_rows)
        new_input = initial_input.clone().requires_grad_(not tied)
        groups = []
        if fit_output:
            groups.append({"params": [piece_weights, offsets], "lr": PIECE_LEARNING_RATE})
        if free_rows:
            groups.append({"params": [row_delta], "lr": settings.learning_rate * float(scale)})
        if not tied:
            groups.append({"params": [new_input], "lr": settings.learning_rate * float(scale)})
        optimizer = torch.optim.Adam(groups)
        base_input = input_weight.detach()[:base_size].float()
        is_new = ids >= base_size
        keep_input = seen[base_size:, None]  # rows of tokens without contexts keep their input row

        def output_rows():
            weights = piece_weights[bucket]  # [new rows, slots]
            rows_ = (weights[..., None] * piece_rows).sum(1) + offsets[bucket][:, None] * unit
            rows_ = torch.where(has_pieces, rows_, initial_output) if fit_output else initial_output
            return rows_ + torch.where(keep_input, row_delta, torch.zeros_like(row_delta)) if free_rows else rows_

        def objective():
            current = output_rows()
            cross_entropy = _next_token_cross_entropy(features @ current.T, base_lse, new_target, base_target_logit)
            moved = row_delta if free_rows else new_input - initial_input
            change = moved.pow(2).mean(1).sum() / scale ** 2 / len(targets)
            table = current if tied else torch.where(keep_input, new_input, initial_input)
            embeds = torch.where(is_new[..., None], table[(ids - base_size).clamp(min=0)],
                                 base_input[ids.clamp(max=base_size - 1)])
            student = _hidden_after(decoder, layers, inputs_embeds=embeds.to(input_weight.dtype))
            mse = torch.nn.functional.mse_loss(student.float(), teacher_hidden)
            return cross_entropy, settings.regularisation * change, mse

        for parameter in parameters:
            parameter.requires_grad_(False)
        before = after = None
        try:
            for step in range(settings.steps + 1):
                optimizer.zero_grad()
                cross_entropy, penalty, mse = objective()
                if world > 1:  # the distillation term is a mean over this process's contexts
                    mse_total = mse.detach().clone()
                    torch.distributed.all_reduce(mse_total)
                    mse_value = float(mse_total) / world
                else:
                    mse_value = float(mse.detach())
                figures = {"next_token_cross_entropy": float(cross_entropy.detach()),
                           "pull_to_subword_mean": float(penalty.detach()), "hidden_state_mse": mse_value}
                cross_entropy = cross_entropy + penalty
                if step == 0:
                    before = figures
                if step == settings.steps:
                    after = figures
                    break
                # the cross-entropy is the same on every process (gathered features); the distillation
                # term is this process's share: summed over processes, the gradient is their mean
                ((cross_entropy + mse) / world).backward()
                if world > 1:
                    for group in optimizer.param_groups:
                        for tensor in group["params"]:
                            if tensor.grad is not None:
                                torch.distributed.all_reduce(tensor.grad)
                optimizer.step()
                progress.update(1)
                progress.set_postfix(figures, refresh=False)
        finally:
            for parameter in parameters:
                parameter.requires_grad_(True)
            progress.close()
            model.train(was_training)
        with torch.no_grad():
            final_output = output_rows()
            if rank == 0 or not any(hasattr(p, "ds_id") for p in parameters):
                output_weight[base_size:] = final_output.to(output_weight.dtype)
                if not tied:
                    input_weight[base_size:] = torch.where(keep_input, new_input, initial_input).to(input_weight.dtype)
    new_tokens_seen = int(seen[base_size:base_size + len(decompositions)].sum())
    return {
        "method": "token distillation (input) + next-token fit on the base model's hidden states (output)"
                  + (", one tied row" if tied else ""),
        "contexts": len(usable),
        "context_tokens": len(usable) * contexts.shape[1],
        "base_tokens_in_contexts": sum(len(base_ids) for _, base_ids, _ in usable),
        "contexts_with_a_token_without_pieces": without_pieces,
        "new_tokens_with_contexts": new_tokens_seen,
        "new_tokens_without_contexts": len(decompositions) - new_tokens_seen,
        "fallback_note": "new tokens without contexts keep subword_mean input rows; every new output row is in the fit",
        "target_layer": layers,
        "steps": settings.steps,
        "learning_rate": settings.learning_rate,
        "output_rows": "weighted sum of the base pieces' output rows + a logit offset, per number of pieces"
                       if settings.fit_output or tied else "subword_mean",
        "logit_offset_by_number_of_pieces": [round(float(x), 3) for x in offsets.detach()],
        "objective_before": before,
        "objective_after": after,
        "processes": world,
        "seconds": time.time() - started,
    }


def _piece_rows(decompositions, new_ids, base_output, start_rows):
    """[new tokens, 3, d]: the output rows of each new token's first piece, the mean of its middle
    pieces (0 with fewer than 3) and its last piece; a token without pieces has its start row as first
    and last. And the bucket of each token: its number of pieces, those with PIECE_BUCKETS or more
    together."""
    slots = torch.zeros(len(new_ids), 3, base_output.shape[1], device=base_output.device)
    bucket = torch.zeros(len(new_ids), dtype=torch.long, device=base_output.device)
    for row, index in enumerate(new_ids.tolist()):
        parts = decompositions[index]
        if not parts:
            slots[row, 0] = slots[row, 2] = start_rows[row]
            continue
        slots[row, 0], slots[row, 2] = base_output[parts[0]], base_output[parts[-1]]
        if len(parts) > 2:
            slots[row, 1] = base_output[parts[1:-1]].mean(0)
        bucket[row] = min(len(parts), PIECE_BUCKETS)
    return slots, bucket


def _subword_mean_piece_weights(device):
    """[buckets, 3] weights of (first, middle mean, last) that give subword_mean: 1/k, (k-2)/k, 1/k
    (bucket 0, no pieces, and 1, one piece: the first slot alone)."""
    weights = torch.zeros(PIECE_BUCKETS + 1, 3, device=device)
    weights[:2, 0] = 1.0
    for pieces in range(2, PIECE_BUCKETS + 1):
        weights[pieces] = torch.tensor([1.0, pieces - 2.0, 1.0]) / pieces
    return weights


def _piece_row_chunks(decompositions, new_ids, base_output, start_rows):
    """(piece rows [chunk, 3, d], bucket [chunk]) a chunk of new tokens at a time: all at once they
    would be [new tokens, 3, d], 4 GiB of fp32 for 88,000 new rows of 4,096 at 7B."""
    for ids, rows in zip(new_ids.split(PIECE_ROW_CHUNK), start_rows.split(PIECE_ROW_CHUNK)):
        yield _piece_rows(decompositions, ids, base_output, rows)


def _fit_piece_weights(features, new_target, base_lse, base_target_logit, along, piece_row_chunks, count,
                       settings, progress):
    """piece_fit's first stage: per bucket of piece counts, the weights of the (first, middle mean,
    last) piece rows and a logit offset per piece count, by L-BFGS on `piece_weight_positions`
    positions drawn once (seed 0: the same draw on every process). Linear logits, so convex.
    `piece_row_chunks()` yields (piece rows, bucket) per chunk of new tokens, in id order."""
    draw = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:settings.piece_weight_positions]
    draw = draw.to(features.device)
    drawn, slot_logits, buckets = features[draw], [], []
    with torch.no_grad():
        for slot_rows, chunk_bucket in piece_row_chunks():
            slot_logits.append(torch.einsum("pd,nsd->spn", drawn, slot_rows))
            buckets.append(chunk_bucket)
    slot_logits, bucket = torch.cat(slot_logits, dim=2), torch.cat(buckets)  # [3, positions, new], [new]
    lse, target_logit, target, shift = base_lse[draw], base_target_logit[draw], new_target[draw], along[draw]
    weights = _subword_mean_piece_weights(features.device).requires_grad_(True)
    by_count = torch.zeros(int(count.max()) + 1, device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, by_count], lr=1, max_iter=settings.piece_weight_iterations,
                                  line_search_fn="strong_wolfe")

    def objective():
        per_token = weights[bucket]  # [new, 3]
        logits = (slot_logits[0] * per_token[:, 0] + slot_logits[1] * per_token[:, 1] + slot_logits[2] * per_token[:, 2]
                  + by_count[count][None, :] * shift[:, None])  # [positions, new]
        return _next_token_cross_entropy(logits, lse, target, target_logit)

    def closure():
        optimizer.zero_grad()
        value = objective()
        value.backward()
        progress.update(1)
        return value

    with torch.no_grad():
        before = float(objective())
    optimizer.step(closure)
    with torch.no_grad():
        after = float(objective())
    return weights.detach(), {"positions": len(draw), "next_token_cross_entropy_before": before,
                              "next_token_cross_entropy_after": after}


def _fit_logit_offsets(model, decompositions, base_size, mine, world, settings, started, report, piece_weights=False):
    """offset_fit (module doc): new output row = its subword_mean row + b_t v; piece_fit: the row is a
    fitted weighting of its pieces' rows (`_fit_piece_weights`) + b_t v. Runs inside fit_new_rows'
    gathered parameters. Every process computes the hidden states of its share of the contexts; all
    gather them and run the same deterministic fit."""
    from tqdm.auto import tqdm

    input_weight = model.get_input_embeddings().weight
    output_module = model.get_output_embeddings()
    tied = output_module is None or output_module.weight is input_weight
    output_weight = input_weight if tied else output_module.weight
    device = input_weight.device
    decoder = model.get_decoder()
    rank = _rank_and_world()[0]
    progress = tqdm(total=len(mine) + settings.offset_iterations
                    + (settings.piece_weight_iterations if piece_weights and not tied else 0),
                    desc="embedding init (piece fit)" if piece_weights else "embedding init (offset fit)",
                    unit="step", disable=rank != 0)
    was_training = model.training
    model.eval()
    features, targets = [], []
    with torch.no_grad():  # the extended model's own final hidden states (subword_mean rows), once
        for first in range(0, len(mine), 16):  # batches of equal-length contexts
            batch = torch.stack([context for context, _, _ in mine[first:first + 16]])
            features.append(decoder(input_ids=batch).last_hidden_state[:, :-1].float().flatten(0, 1))
            targets.append(batch[:, 1:].flatten())
            progress.update(len(batch))
    model.train(was_training)
    features = _all_gather_rows(torch.cat(features), world)  # [P, d]: position j predicts token j + 1
    targets = _all_gather_rows(torch.cat(targets), world)
    new_ids = torch.tensor(sorted(decompositions), device=device)
    count = torch.tensor([len(decompositions[int(i)]) for i in new_ids], device=device)
    with torch.no_grad():
        base_output = output_weight.detach()[:base_size].float()
        start_rows = output_weight.detach()[new_ids].float()  # subword_mean (fallback mean without pieces)
        base_lse = torch.cat([torch.logsumexp(chunk @ base_output.T, dim=-1) for chunk in features.split(1024)])
        base_target_logit = (features * base_output[targets.clamp(max=base_size - 1)]).sum(1)
        ridge = 1e-2 * features.pow(2).sum() / len(features)  # bias direction: ridge regression of 1 on h
        gram = features.T @ features + ridge * torch.eye(features.shape[1], device=device)
        direction = torch.linalg.solve(gram, features.sum(0))
        along = features @ direction  # ~1 at every position
        new_target = torch.where(targets >= base_size, targets - base_size, -1)
    piece_report = None
    if piece_weights and tied:
        # a tied row is also the token's input row: the weighting moved held-out JA the wrong way there
        # (1.233x the base against offset_fit's 1.219x, BENCHMARKS.md), so a tied head keeps subword_mean's
        piece_report = {"skipped": "tied head: the output row is also the input row; subword_mean weights kept "
                                   "(the rows are offset_fit's)"}
    elif piece_weights:
        subword_rows = start_rows

        def piece_row_chunks():
            return _piece_row_chunks(decompositions, new_ids, base_output, subword_rows)

        weights, piece_report = _fit_piece_weights(features, new_target, base_lse, base_target_logit, along,
                                                   piece_row_chunks, count, settings, progress)
        with torch.no_grad():
            start_rows = torch.cat([(weights[bucket][:, :, None] * slot_rows).sum(1)
                                    for slot_rows, bucket in piece_row_chunks()])
        piece_report["weights_first_middle_last_by_number_of_pieces"] = {
            ("no pieces" if k == 0 else f"{k}+" if k == PIECE_BUCKETS else str(k)): [round(float(x), 3) for x in row]
            for k, row in enumerate(weights)}
    with torch.no_grad():
        start_logits = features @ start_rows.T  # [P, new]
    seen = torch.zeros(len(new_ids), dtype=torch.bool, device=device)
    seen[new_target[new_target >= 0]] = True
    by_count = torch.zeros(int(count.max()) + 1, device=device, requires_grad=True)
    per_token = torch.zeros(len(new_ids), device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([by_count, per_token], lr=1, max_iter=settings.offset_iterations,
                                  line_search_fn="strong_wolfe")
    evaluations = []

    def objective():
        offsets = by_count[count] + per_token
        cross_entropy = _next_token_cross_entropy(start_logits + offsets[None, :] * along[:, None], base_lse,
                                                  new_target, base_target_logit)
        pull = settings.offset_pull * per_token.pow(2).sum() / len(targets)
        return cross_entropy, pull

    def closure():
        optimizer.zero_grad()
        cross_entropy, pull = objective()
        (cross_entropy + pull).backward()
        evaluations.append(1)
        progress.update(1)
        return cross_entropy + pull

    with torch.no_grad():
        before = {name: float(x) for name, x in zip(("next_token_cross_entropy", "offset_pull"), objective())}
    optimizer.step(closure)
    progress.close()
    with torch.no_grad():
        after = {name: float(x) for name, x in zip(("next_token_cross_entropy", "offset_pull"), objective())}
        offsets = by_count[count] + per_token
        rows = start_rows + offsets[:, None] * direction[None, :]
        if rank == 0 or not hasattr(output_weight, "ds_id"):
            output_weight[new_ids] = rows.to(output_weight.dtype)
    for figures in (before, after):
        figures["hidden_state_mse"] = 0.0
    new_tokens_seen = int(seen.sum())
    return {
        "method": "subword_mean (input) + "
                  + ("fitted weights of the first, middle and last piece's output rows" if piece_weights and not tied
                     else "subword_mean output row")
                  + " + a fitted logit offset along a bias direction"
                  + (", one tied row (input rows change too)" if tied else ""),
        **report,
        "piece_weights": piece_report,
        "positions": len(targets),
        "new_tokens_with_contexts": new_tokens_seen,
        "new_tokens_without_contexts": len(new_ids) - new_tokens_seen,
        "fallback_note": "new tokens without contexts get the offset of their number of pieces",
        "bias_direction_fit": {"mean": float(along.mean()), "std": float(along.std())},
        "logit_offset_by_number_of_pieces": [round(float(x), 3) for x in by_count.detach()],
        "lbfgs_evaluations": len(evaluations),
        "objective_before": before,
        "objective_after": after,
        "processes": world,
        "seconds": time.time() - started,
    }


def embedding_weights(model) -> dict:
    """{id: weight} of the input and output embedding matrices; a tied head is one tensor."""
    modules = (model.get_input_embeddings(), model.get_output_embeddings())
    return {id(m.weight): m.weight for m in modules if m is not None and getattr(m, "weight", None) is not None}


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
        self.embedding_weights = embedding_weights(model)
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


class NewRowsLearningRate:
    """The new embedding rows (ids >= `first_new_row`) learn at `multiplier` x the embedding group's learning
    rate, at every step of the schedule (pretrain.py's --new_embeddings_lr_multiplier).

    The new rows are rows of the same tensors as the base rows (and under ZeRO-3 each process holds a flat
    slice of each tensor), so no optimizer param group can hold them alone; and scaling their gradient
    would change nothing under Adam (its step is invariant to a per-element gradient scale). Their
    *update* is scaled instead: `remember()` before an optimizer step keeps the new rows' values, `apply()`
    after it sets them to before + multiplier x (after - before). For AdamW that is exactly a per-row
    learning rate of multiplier x lr (the decoupled weight decay is scaled by lr too; the embedding group
    has none anyway); Adam's moments do not depend on the learning rate. Stateless beyond one step: a
    skipped step (fp16 overflow) moved nothing, so there is nothing to scale, and a resumed run needs no
    saved state. A tied head is one tensor, scaled once.

    Plain torch (one process, DDP): the parameters themselves. DeepSpeed ZeRO-3: the process's fp32 master
    partition, read and written with DeepSpeed's public `safe_get_local_fp32_param` /
    `safe_set_local_fp32_param`; the set does not reach the low-precision partition (`param.ds_tensor`)
    the forward pass gathers, which the ZeRO-3 optimizer had already copied from the master at its step,
    so the same cast copy is made here for the new rows. A process's partition is elements
    [rank x size, (rank + 1) x size) of the flattened matrix, padded at the end to a multiple of the
    processes; the new rows are elements >= first_new_row x hidden size.
    """

    def __init__(self, model, first_new_row: int, multiplier: float):
        if not (isinstance(multiplier, (int, float)) and math.isfinite(multiplier) and multiplier > 0):
            raise ValueError(f"--new_embeddings_lr_multiplier must be a positive number, not {multiplier!r}")
        self.first_new_row, self.multiplier = first_new_row, float(multiplier)
        self.weights = list(embedding_weights(model).values())  # tied: one tensor, scaled once
        self.saved = None

    def _local_new_elements(self, weight):
        """(this process's master values of `weight`, [lo, hi) of its new-row elements in them, ZeRO-3?)."""
        if not hasattr(weight, "ds_id"):
            return weight.data.view(-1), self.first_new_row * weight.shape[1], weight.numel(), False
        from deepspeed.utils import safe_get_local_fp32_param

        if getattr(weight, "ds_persist", False):
            raise ValueError("--new_embeddings_lr_multiplier: a ZeRO-3 persistent embedding matrix (smaller than "
                             "stage3_param_persistence_threshold) is not supported: lower the threshold")
        local = safe_get_local_fp32_param(weight)
        size = weight.ds_tensor.ds_numel
        start = torch.distributed.get_rank(group=weight.ds_process_group) * size
        first = self.first_new_row * weight.ds_shape[1]
        lo = min(max(first - start, 0), size)
        hi = min(max(weight.ds_numel - start, 0), size)  # the rest is padding
        return local, lo, max(lo, hi), True

    @torch.no_grad()
    def remember(self, step=None):
        """Before an optimizer step (before its first micro-batch): keep the new rows' values."""
        self.saved = []
        for weight in self.weights:
            local, lo, hi, _ = self._local_new_elements(weight)
            self.saved.append(local[lo:hi].clone())

    @torch.no_grad()
    def apply(self, step=None):
        """After the optimizer step: scale the new rows' update by the multiplier."""
        if self.saved is None:
            raise RuntimeError("NewRowsLearningRate.apply() without remember() before the optimizer step")
        for weight, before in zip(self.weights, self.saved):
            local, lo, hi, zero3 = self._local_new_elements(weight)
            if hi == lo:
                continue  # this process holds no new-row element of this matrix
            after = local[lo:hi]
            scaled = (before.float() + self.multiplier * (after.float() - before.float())).to(after.dtype)
            if not zero3:
                after.copy_(scaled)
                continue
            from deepspeed.utils import safe_set_local_fp32_param

            updated = local.clone()
            updated[lo:hi] = scaled
            safe_set_local_fp32_param(weight, updated)
            weight.ds_tensor.data[lo:hi].copy_(scaled)  # the low-precision copy the forward pass gathers
        self.saved = None
