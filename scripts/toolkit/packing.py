"""Per-document attention for packed blocks, true for every attention kernel and batch size, and checked.

    document_collate(attn_implementation) -> collate_fn
                    the training collate: stacks blocks into (B, T) for sdpa / eager / flex_attention
                    (transformers builds a per-row block-diagonal mask, or block mask, from the restarting
                    position ids at any batch size); for a flash-attention kernel it flattens the B blocks
                    into one row of B x T tokens with the document boundaries passed explicitly
                    (`cu_seq_lens_q/k`, `max_length_q/k`, as transformers' DataCollatorWithFlattening
                    and torchtitan do), because transformers' flash path finds documents in the position
                    ids only at batch 1 and at batch > 1 silently attends across them
    DocumentAttentionProbe(model, per_document=True)
                    a forward pre-hook on the model's first attention module that reads, on the first
                    micro-batch with a document start inside a row, what the attention kernel receives (the 4-D mask, the flex BlockMask,
                    or flash's cu_seq_lens) and decides whether a token can see the previous document;
                    `.result` (dict for the report; None until such a micro-batch was seen); raises
                    DocumentAttentionError in that forward pass if per-document attention was asked for
                    and the kernel did not get it

Why a probe rather than a flag: per-document attention depends on the kernel, the batch size, the KV
cache setting and the transformers version (see above); the report's `per_document_attention` states
what the kernel received, not what was intended.
"""

import torch

IGNORE_INDEX = -100


class DocumentAttentionError(ValueError):
    """Per-document attention was asked for and the attention kernel did not receive the boundaries."""


def is_flash_attention(attn_implementation) -> bool:
    from transformers.utils.generic import is_flash_attention_requested

    return bool(attn_implementation) and is_flash_attention_requested(requested_attention_implementation=attn_implementation)


def stack(examples):
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def flatten_for_varlen(batch):
    """(B, T) blocks with restarting position ids -> one row of B x T tokens with explicit document
    boundaries for flash-attention's varlen kernel. Every block starts a segment (its first position is
    0 and its first label IGNORE_INDEX: no token is predicted across blocks, as before flattening)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    positions = batch["position_ids"]
    if (positions[:, 0] != 0).any():
        raise ValueError("every block must start at position 0 to be flattened (token_shards.TokenBlocks does)")
    flat = {key: value.reshape(1, -1) for key, value in batch.items()}
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(flat["position_ids"])
    # python ints: flash-attention takes max_seqlen as an int (a tensor would sync in every layer)
    return {**flat, "cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": int(max_q),
            "max_length_k": int(max_k)}


def document_collate(attn_implementation, per_document=True):
    """The collate function for `attn_implementation` (see the module doc)."""
    if per_document and is_flash_attention(attn_implementation):
        return lambda examples: flatten_for_varlen(stack(examples))
    return stack


def _first_attention_module(model):
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "is_causal") and hasattr(module, "config"):
            return module
    raise ValueError(f"{type(model).__name__}: no attention module with layer_idx found to probe")


def _boundaries(position_ids):
    """(row, first token) of every document that is not the first of its row."""
    starts = (position_ids == 0).nonzero().tolist()
    return [(row, column) for row, column in starts if column > 0]


def _can_attend(mask, row, query, key):
    """Whether `mask` (what the kernel got: None, a 4-D bool/float tensor, or a flex BlockMask) lets
    `query` see `key` in `row`."""
    if mask is None:
        return True  # plain causal: every earlier key
    if hasattr(mask, "mask_mod"):  # flex_attention BlockMask
        index = lambda value: torch.tensor(value, device=mask.kv_indices.device)  # noqa: E731
        return bool(mask.mask_mod(index(row), index(0), index(query), index(key)))
    value = mask[row if mask.shape[0] > 1 else 0, 0, query, key]
    return bool(value) if mask.dtype == torch.bool else bool(value > torch.finfo(mask.dtype).min / 2)


class DocumentAttentionProbe:
    def __init__(self, model, per_document=True):
        self.per_document = per_document
        self.result = None
        self.micro_batches_without_boundaries = 0
        self._handle = _first_attention_module(model).register_forward_pre_hook(self._read, with_kwargs=True)

    def _read(self, module, args, kwargs):
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        position_ids = kwargs.get("position_ids")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        batch = int(hidden.shape[0]) if hidden is not None else None
        implementation = module.config._attn_implementation
        if position_ids is None:
            return
        position_ids = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
        boundaries = _boundaries(position_ids)
        if not boundaries:  # one document per row in this micro-batch: nothing to tell yet, look at the next
            self.micro_batches_without_boundaries += 1
            return
        self._handle.remove()  # the first micro-batch with documents to keep apart tells; later ones are alike
        if "cu_seq_lens_q" in kwargs and kwargs["cu_seq_lens_q"] is not None:
            given = set(kwargs["cu_seq_lens_q"].tolist())
            flat = position_ids.reshape(-1)
            expected = set((flat == 0).nonzero().view(-1).tolist()) | {flat.numel()}
            isolated = expected <= given
            evidence = (f"flash varlen: {len(given) - 1} segments in cu_seq_lens_q, "
                        f"{'every' if isolated else 'not every'} document start among them")
        elif mask is None and is_flash_attention(implementation):
            # transformers finds documents in the position ids itself only at batch 1
            isolated = batch == 1 or not boundaries
            evidence = f"flash without cu_seq_lens at batch {batch}: " + (
                "documents from the position ids" if batch == 1 else "dense kernel, rows attend across documents")
        else:
            leaks = [(row, start) for row, start in boundaries if _can_attend(mask, row, start, start - 1)]
            isolated = not leaks
            kind = "none (causal)" if mask is None else "flex BlockMask" if hasattr(mask, "mask_mod") \
                else f"{tuple(mask.shape)} {str(mask.dtype).replace('torch.', '')} tensor"
            evidence = (f"mask {kind}: {len(boundaries)} document starts after a row's first, "
                        f"{len(leaks)} of them see the previous document")
        self.result = {"per_document_attention": bool(isolated), "attn_implementation": implementation,
                       "evidence": evidence, "micro_batch_rows": batch,
                       "documents_after_the_first_in_a_row": len(boundaries),
                       "micro_batches_before": self.micro_batches_without_boundaries}
        self.check()  # refuse before the first step rather than train across documents

    def check(self):
        """The result; DocumentAttentionError when per-document attention was asked for and not received."""
        if self.result is None:
            raise RuntimeError("the attention probe has not seen a forward pass yet")
        if self.per_document and not self.result["per_document_attention"]:
            raise DocumentAttentionError(
                f"per-document attention was asked for, but the {self.result['attn_implementation']} kernel "
                f"received no document boundaries ({self.result['evidence']}): use --attn_implementation "
                "sdpa or flex_attention, or report this with the transformers version")
        return self.result
