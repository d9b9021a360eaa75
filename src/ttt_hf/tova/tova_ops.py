"""TOVA operations: the torch reference of scoring and eviction (the numerical definition) and the dispatch point of
a decode step's eviction, which a Triton kernel does on CUDA (`tova_triton`).

Scores: the last query's softmax over the cached keys, averaged over the query heads, exactly as the model's
attention computed it. Eviction: per row, the slots with the lowest score ("tova") or position ("window") go;
padding first, the first `num_sink_tokens` real tokens never.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

try:
    from .tova_triton import tova_attention_evict_one_triton, tova_decode_step_inplace, tova_evict_one_triton
except ImportError:  # triton is optional: the torch path runs everywhere
    tova_attention_evict_one_triton = tova_decode_step_inplace = tova_evict_one_triton = None

logger = logging.getLogger(__name__)

POLICIES = ("tova", "window")
KERNEL_BACKENDS = ("auto", "triton", "torch")


def last_query_scores(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax of the last query over `key`, averaged over the query heads: [B, kv_len] fp32.

    query: [B, Hq, q, d]; key: [B, Hkv, kv, d] (GQA handled without repeating keys). Slots the mask hides
    get exactly -inf, so padding always ranks below every real token.
    """
    batch, q_heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    scaling = head_dim**-0.5 if scaling is None else scaling
    q = query[:, :, -1].float().view(batch, kv_heads, q_heads // kv_heads, head_dim)
    logits = torch.einsum("bhgd,bhkd->bhgk", q, key.float()) * scaling  # [B, Hkv, G, kv]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    hidden = None
    row = last_mask_row(attention_mask, batch, query.shape[2], key.shape[2])
    if row is not None:
        if row.dtype == torch.bool:
            hidden = ~row
        else:
            logits = logits + row.float()[:, None, None, :]
            hidden = row <= torch.finfo(row.dtype).min / 2
        logits = logits.masked_fill(hidden[:, None, None, :], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, kv_heads, q_heads // kv_heads, 1).expand(batch, -1, -1, 1)
        probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1)
    scores = probs.mean(dim=(1, 2))
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


def last_mask_row(attention_mask, batch: int, q_len: int, kv_len: int) -> torch.Tensor | None:
    """The last query's row of the attention mask: [B or 1, kv], boolean (True = attend) or additive; None
    when nothing is hidden. A 2-D mask (flash kinds) is accepted only without padding."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        return _block_mask_last_row(attention_mask, batch, q_len, kv_len)
    if attention_mask.dim() == 4:
        return attention_mask[:, 0, -1, -kv_len:]
    if attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise NotImplementedError(
            "TOVACache with a flash-attention kind and a padded batch is not supported: the 2-D padding mask "
            "indexes logical positions, which eviction reorders; use attn_implementation='sdpa' for padded batches"
        )
    return None


def _block_mask_last_row(block_mask, batch: int, q_len: int, kv_len: int) -> torch.Tensor:
    """The last query's row of a flex-attention `BlockMask` as a boolean mask [B, kv] (True = attend).
    transformers builds the mask_mod with the query/key offsets and the padding folded in."""
    device = block_mask.kv_num_blocks.device
    row = block_mask.mask_mod(
        torch.arange(batch, device=device)[:, None],
        torch.zeros(1, 1, dtype=torch.long, device=device),
        torch.full((1, 1), q_len - 1, dtype=torch.long, device=device),
        torch.arange(kv_len, device=device)[None, :],
    )
    return row.expand(batch, kv_len)


def eviction_keys(scores: torch.Tensor, positions: torch.Tensor, policy: str, num_sink_tokens: int) -> torch.Tensor:
    """What eviction minimises per slot [B, n]: the score ("tova") or the position ("window") of real slots;
    -inf for hidden ones (padding), +inf for the sink tokens. Sinks are the first `num_sink_tokens` real
    positions of the row, not slots: a swap-remove moves the newest token in front of them."""
    real = scores > float("-inf")
    keys = torch.where(real, positions.float(), float("-inf")) if policy == "window" else scores
    if num_sink_tokens:
        first = positions.masked_fill(~real, torch.iinfo(positions.dtype).max).amin(-1, keepdim=True)
        keys = keys.masked_fill(real & (positions - first < num_sink_tokens), float("inf"))
    return keys


def kept_slots(
    scores: torch.Tensor, positions: torch.Tensor, budget: int, policy: str, num_sink_tokens: int
) -> torch.Tensor:
    """Sorted slot indices [B, budget] that survive. Ties evict the highest slot first."""
    keys = eviction_keys(scores, positions, policy, num_sink_tokens)
    slots = keys.shape[-1]
    ascending = torch.sort(keys.flip(-1), dim=-1, stable=True).indices  # ties: higher slot first
    kept = slots - 1 - ascending[:, slots - budget :]
    return kept.sort(dim=-1).values


def victims(scores: torch.Tensor, positions: torch.Tensor, policy: str, num_sink_tokens: int) -> torch.Tensor:
    """The slot [B] each row evicts when one goes: the lowest key, ties to the highest slot (argmin takes the
    first of equal values, so it runs on the flipped keys), which makes the highest pad go first."""
    keys = eviction_keys(scores, positions, policy, num_sink_tokens)
    return keys.shape[-1] - 1 - keys.flip(-1).argmin(-1)


@functools.cache
def _log_fallback_once() -> None:
    logger.warning(
        "kernel_backend='triton': no TOVA kernel for this call (gradients, fp64, head_dim > 256 or keys that are not "
        "the cache's); using the torch path"
    )


def use_decode_kernel(
    kernel_backend: str,
    at_budget: bool,
    query: torch.Tensor,
    key: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    sinks: torch.Tensor | None,
    value: torch.Tensor | None = None,
) -> bool:
    """Whether a Triton kernel evicts this step of a layer holding `keys`, `values`: one slot per row to drop
    (`at_budget`: budget + 1 slots), no gradient, fp32/bf16/fp16 with head dims up to 256, and the attention's
    `key` (and `value`, for the fused attention) are the layer's. Elsewhere the torch path runs, so a result is
    never wrong."""
    if kernel_backend == "torch" or tova_evict_one_triton is None:
        return False
    if kernel_backend == "triton" and not (query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError(
            "kernel_backend='triton' on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 before importing "
            "triton, or use kernel_backend='auto'"
        )
    if not at_budget or not (query.is_cuda or kernel_backend == "triton"):
        return False
    grad = query.requires_grad or key.requires_grad or (value is not None and value.requires_grad)
    supported = (
        not (torch.is_grad_enabled() and grad)
        and query.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and query.dtype == key.dtype == values.dtype
        and _same_tensor(key, keys)
        and query.shape[1] % key.shape[1] == 0
        and max(query.shape[-1], values.shape[-1]) <= 256
        and query.stride(-1) == 1
        and (sinks is None or sinks.numel() == query.shape[1])
        and (value is None or _same_tensor(value, values))
    )
    if kernel_backend == "triton" and not supported:
        _log_fallback_once()
    return supported


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` is the memory of `b` (under `torch.compile`, which has no addresses: the same tensor)."""
    if torch.compiler.is_compiling():
        return a is b
    return a.shape == b.shape and a.data_ptr() == b.data_ptr()


def evict_one_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    attention_mask,
    scaling: float | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
    num_sink_tokens: int,
    policy: str,
    attend: bool,
) -> torch.Tensor | None:
    """The Triton decode step over budget + 1 slots: moves each row's last slot into its victim's (in place) and,
    with `attend`, returns the last query's attention output [B, 1, Hq, dv] computed in the same pass."""
    row = last_mask_row(attention_mask, query.shape[0], query.shape[2], keys.shape[2])
    args = (
        query[:, :, -1],
        keys,
        values,
        positions,
        row,
        query.shape[-1] ** -0.5 if scaling is None else scaling,
        softcap,
        sinks,
        num_sink_tokens,
    )
    if torch.compiler.is_compiling():
        output = tova_decode_step_inplace(*args, policy == "window", attend)
        return output if attend else None
    kernel = tova_attention_evict_one_triton if attend else tova_evict_one_triton
    result = kernel(*args, window=policy == "window")
    return result[0] if attend else None
