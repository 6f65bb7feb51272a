"""The causal-LM loss without ever holding the logits whole (120k vocabularies), for pretrain and finetune.

    chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=1024, num_items_in_batch=None) -> loss
                    mean (or sum / num_items_in_batch) next-token cross-entropy of `hidden @ weight.T`,
                    computed `chunk_size` rows at a time: forward and gradient of a chunk are done together
                    (the Liger-Kernel scheme in pure PyTorch), so peak memory holds one chunk's fp32 logits,
                    not B x T x V of them. Exact: tested equal to the plain loss in value and gradients.
    use_fused_loss(model, implementation="chunked"|"liger", chunk_size=1024)
                    replace the model's forward (this instance only) by base model -> last hidden states ->
                    fused loss; `model(input_ids=..., labels=..., position_ids=..., num_items_in_batch=...)`
                    then returns `.loss` (and `.logits` None); without labels it is the model's own forward. Under ZeRO-3 the LM head's partitioned weight is
                    registered as an external parameter of the model, so DeepSpeed gathers it for the forward.
    apply_liger_kernels(model)  Liger's RMSNorm / RoPE / SwiGLU kernels (GPU, `pip install -r requirements-gpu.txt`)

Why not the plain loss: at micro-batch 4 x 4096 x 120k the bf16 logits are 3.9 GB, their fp32 upcast
7.9 GB and the log-softmax another 7.9 GB, ~20 GB for the loss alone.
"""

import types

import torch

IGNORE_INDEX = -100
IMPLEMENTATIONS = ("chunked", "liger", "plain")


# Logits upcast to fp32 at a time (2**25 x 4 bytes = 128 MiB: 279 rows of a 120k vocabulary).
_FP32_ELEMENTS = 2**25


def _softmax_gradient_(logits, target, valid, lse=None, column_offset=0):
    """In place: `logits` (rows x columns, the model's dtype) become d(sum of losses)/d(logits) =
    softmax - one_hot(target), zero on ignored rows; a few rows at a time are upcast to fp32 for the
    exponentials (`_FP32_ELEMENTS`), so no fp32 copy of the whole buffer exists. Without `lse` the columns are the
    whole vocabulary: returns (lse, the target's logit) per row. With `lse` (from the first pass) the
    columns are the vocabulary slice starting at `column_offset`; returns None."""
    wide = torch.promote_types(logits.dtype, torch.float32)  # fp32 for bf16/fp16 models
    found = None if lse is not None else (torch.empty(len(logits), dtype=wide, device=logits.device),
                                          torch.empty(len(logits), dtype=wide, device=logits.device))
    step = max(1, _FP32_ELEMENTS // logits.shape[1])
    for start in range(0, len(logits), step):
        rows = slice(start, start + step)
        block = logits[rows].to(wide)  # the same tensor when the model is fp32 or fp64
        y, keep = target[rows], valid[rows]
        if lse is None:
            row_lse = torch.logsumexp(block, dim=-1)
            found[0][rows] = row_lse
            found[1][rows] = block.gather(1, y[:, None])[:, 0]
        else:
            row_lse = lse[rows].to(block.dtype)
        block.sub_(row_lse[:, None]).exp_()
        column = y - column_offset
        hit = keep & (column >= 0) & (column < block.shape[1])  # the target is in these columns
        block[torch.arange(len(y), device=y.device), column.clamp(0, block.shape[1] - 1)] -= hit.to(block.dtype)
        block *= keep[:, None]
        if block.dtype != logits.dtype:
            logits[rows].copy_(block)
    return found


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in the forward pass; with 16-bit weights over several chunks, in two passes
    over the LM head so that memory holds one chunk of logits plus the head's gradient in the weight's
    dtype, and nothing else V x H (fp32/fp64 weights, or one chunk: pass 1 alone, the head gradient
    summed in place, exact):

    1. token chunks (`chunk_size` rows): logits -> per-row log-sum-exp, the loss, and the hidden states'
       gradient (softmax - one_hot) @ W;
    2. vocabulary slices holding as many logits as a token chunk: the slice's logits for *all* tokens
       again, their softmax gradient from pass 1's log-sum-exp, and the slice's rows of the head
       gradient in one matmul over all tokens.

    Pass 2 is why the head gradient is exact in fp32 terms without an fp32 V x H accumulator: each
    row of it is one matmul's sum over every token (fp32 accumulation inside the matmul, rounded to
    the weight's dtype once), not a running sum over chunks rounded after each (Liger's default
    with bf16 weights) nor an fp32 V x H buffer (1.8 GiB at 120k x 4096) plus its copies (the old
    scheme here: 5.3 GiB, BENCHMARKS.md). The price: the logits are computed twice, 4 matmuls of
    the head's size per token instead of 3 (the LM head is ~7% of a 7B step's FLOPs).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, divisor, two_pass):
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        tokens, vocabulary = hidden.shape[0], weight.shape[0]
        valid = labels != IGNORE_INDEX
        target = labels.clamp(min=0)
        accumulate = torch.promote_types(hidden.dtype, torch.float32)  # fp32 sums for bf16 models
        lse = torch.empty(tokens, dtype=accumulate, device=hidden.device)
        picked = torch.empty(tokens, dtype=accumulate, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # one pass: the head gradient summed over chunks in place (exact for fp32/fp64 weights, or one chunk)
        grad_weight = torch.zeros_like(weight) if needs_weight and not two_pass else None
        for start in range(0, tokens, chunk_size):  # pass 1: token chunks
            rows = slice(start, start + chunk_size)
            logits = hidden[rows] @ weight.t()
            lse[rows], picked[rows] = _softmax_gradient_(logits, target[rows], valid[rows])
            if needs_hidden:
                torch.mm(logits, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                grad_weight.addmm_(logits.t(), hidden[rows])
            del logits
        total = ((lse - picked) * valid).sum()
        if needs_weight and two_pass:  # pass 2: vocabulary slices, each over all tokens
            grad_weight = torch.empty_like(weight)
            width = max(1, chunk_size * vocabulary // max(tokens, 1))
            for start in range(0, vocabulary, width):
                columns = slice(start, start + width)
                logits = hidden @ weight[columns].t()
                _softmax_gradient_(logits, target, valid, lse=lse, column_offset=start)
                torch.mm(logits.t(), hidden, out=grad_weight[columns])
                del logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.divisor = divisor
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output / ctx.divisor
        # in place: the saved gradients are used once (retain_graph is not supported)
        return (grad_hidden.mul_(scale.to(grad_hidden.dtype)) if grad_hidden is not None else None,
                grad_weight.mul_(scale.to(grad_weight.dtype)) if grad_weight is not None else None,
                None, None, None, None)


def shift_labels(labels):
    """The targets of positions 0..T-1 (transformers' convention: labels are the input ids)."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=1024, num_items_in_batch=None,
                                 two_pass=None):
    """Next-token loss of `hidden` (B, T, H) through `weight` (V, H) against `labels` (B, T) (unshifted).

    `two_pass` (default: for 16-bit weights over more than one chunk) computes the head gradient in a
    second pass over vocabulary slices, each row summed over all tokens in one matmul; otherwise it is
    summed over the chunks in place, which is exact in fp32/fp64 and for a single chunk."""
    targets = shift_labels(labels).reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if two_pass is None:
        two_pass = weight.element_size() < 4 and hidden.shape[0] > chunk_size
    if num_items_in_batch is None:
        divisor = max(int((targets != IGNORE_INDEX).sum()), 1)
    else:
        divisor = float(num_items_in_batch)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, divisor, two_pass)


def _liger_loss(hidden, weight, labels, num_items_in_batch=None):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    targets = shift_labels(labels).reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    # accum_dtype fp32: the head gradient is summed over chunks in fp32 (liger-kernel 0.8.5's `accum_dtype`;
    # its default sums in the weight's dtype, rounding the running sum to bf16 after every chunk)
    if num_items_in_batch is None:
        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, accum_dtype=torch.float32)(
            weight, hidden, targets)
    total = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum",
                                             accum_dtype=torch.float32)(weight, hidden, targets)
    return total / num_items_in_batch


def require_liger():
    """ImportError with what to do, unless Liger-Kernel can run here (CUDA + triton + liger_kernel)."""
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        raise ImportError("--use_liger_kernel needs a CUDA GPU and `pip install -r requirements-gpu.txt` "
                          "(liger-kernel, triton); on CPU the chunked loss (the default) does the same job")


def apply_liger_kernels(model):
    """Liger's RMSNorm / RoPE / SwiGLU kernels on this model instance (its loss comes from use_fused_loss)."""
    require_liger()
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)


def use_fused_loss(model, implementation="chunked", chunk_size=1024):
    """Make `model(...)` compute its loss with the fused LM head + cross-entropy (this instance only)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"loss implementation must be one of {', '.join(IMPLEMENTATIONS)}, not {implementation!r}")
    if implementation == "plain":
        return model
    if implementation == "liger":
        require_liger()
    from transformers.modeling_outputs import CausalLMOutputWithPast

    base_model = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()

    def forward(self, input_ids=None, labels=None, position_ids=None, attention_mask=None,
                num_items_in_batch=None, **kwargs):
        if labels is None:  # evaluation, generation: the model's own forward
            return type(self).forward(self, input_ids=input_ids, position_ids=position_ids,
                                      attention_mask=attention_mask, **kwargs)
        hidden = base_model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                            use_cache=False, **kwargs).last_hidden_state
        if implementation == "liger":
            loss = _liger_loss(hidden, head.weight, labels, num_items_in_batch)
        else:
            loss = chunked_linear_cross_entropy(hidden, head.weight, labels, chunk_size, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss)

    if hasattr(head.weight, "ds_id"):  # ZeRO-3: gather the head's weight for the model's own forward
        import deepspeed

        deepspeed.zero.register_external_parameter(model, head.weight)
    model.forward = types.MethodType(forward, model)
    return model
