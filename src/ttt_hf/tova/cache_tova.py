"""`TOVACache`: a fixed-budget KV cache for any Hugging Face decoder (Token Omission Via Attention,
arXiv 2401.06104).

After each step's attention, a layer holding more than `budget` tokens drops, per batch row, the tokens
the current query attended to least (softmax probability averaged over all query heads; one index set
per layer and row, shared by all KV heads). A prompt longer than the budget is compressed in one shot by
the last prompt token's scores. Keys are stored after RoPE and never re-rotated; positions keep growing.

transformers contract for a cache shorter than what it has seen: `get_seq_length()` is the number of
tokens seen; `get_mask_sizes(q)` is `(physical + q, seen - physical)`: the kept slots take the last
logical indices. Left padding stays a contiguous block on the left (pads score -inf, eviction is an
order-preserving compaction), so the padding mask keeps lining up.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .tova_attention import install_attention_hooks, last_query_scores, set_pending

POLICIES = ("tova", "window")


class TOVALayer(DynamicLayer):
    """One layer's keys/values `[B, H_kv, n, d]` plus `positions` `[B, n]`: the input column of each slot."""

    is_croppable = False
    is_compileable = False

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.positions: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        batch, new = key_states.shape[0], key_states.shape[-2]
        columns = torch.arange(self.seen, self.seen + new, device=key_states.device).expand(batch, new)
        self.positions = columns if self.positions is None else torch.cat([self.positions, columns], dim=-1)
        self.seen += new
        return keys, values

    @property
    def physical_length(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.physical_length + query_length, self.seen - self.physical_length

    def keep(self, index: torch.Tensor) -> None:
        """Keeps the slots `index` [B, n'] (sorted: order is preserved)."""
        gather = index[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        self.keys = torch.gather(self.keys, 2, gather)
        self.values = torch.gather(self.values, 2, gather.expand(-1, -1, -1, self.values.shape[-1]))
        self.positions = torch.gather(self.positions, 1, index)

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self.positions = None

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(_CROP_ERROR)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.positions is not None:
            self.keys = self.keys[indices.to(self.keys.device)]
            self.values = self.values[indices.to(self.values.device)]
            self.positions = self.positions[indices.to(self.positions.device)]

    @property
    def nbytes(self) -> int:
        if self.positions is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


_CROP_ERROR = (
    "TOVACache cannot be cropped: evicted tokens are gone, so the cache cannot be rolled back. Assisted / "
    "speculative decoding and DoLa need a croppable cache (DynamicCache)."
)


_NO_ATTENTION_ERROR = (
    "TOVACache holds attention keys/values only, and this model has layers without attention (state-space or "
    "linear-attention layers): TOVA does not apply to them"
)


class TOVACache(Cache):
    """Fixed-budget KV cache for any decoder built on transformers' attention interface.

    ```python
    import ttt_hf
    cache = ttt_hf.TOVACache(budget=512)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=2000)
    ```

    Args:
        budget: tokens kept per layer and row (the "multi-state size"), >= 1.
        num_sink_tokens: the first real tokens of each row that are never evicted (default 0: the paper
            finds TOVA keeps the first token anyway).
        policy: `"tova"` (evict the least attended token) or `"window"` (evict the oldest: a sliding window,
            which with sink tokens is the "window + sinks" baseline).

    Sliding-window layers (Mistral, Gemma 2/3, ...) whose window is at most the budget keep their last
    `window - 1` tokens as transformers' own sliding layers do; the budget applies to the others.
    """

    is_compileable = False

    def __init__(self, budget: int, num_sink_tokens: int = 0, policy: str = "tova") -> None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
        if isinstance(num_sink_tokens, bool) or not isinstance(num_sink_tokens, int) or not 0 <= num_sink_tokens < budget:
            raise ValueError(f"num_sink_tokens must be an integer in [0, budget), got {num_sink_tokens!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        super().__init__(layers=[])
        self.budget = budget
        self.num_sink_tokens = num_sink_tokens
        self.policy = policy
        self._owner: int | None = None
        install_attention_hooks()

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(budget={self.budget}, policy={self.policy!r}, layers={len(self.layers)})"

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if len(self.layers) <= layer_idx:
            install_attention_hooks()  # attention kinds registered since the cache was made (hub kernels)
            self.layers.extend(TOVALayer() for _ in range(layer_idx + 1 - len(self.layers)))
        layer = self.layers[layer_idx]
        if layer.positions is not None and (
            key_states.shape[0] != layer.keys.shape[0] or key_states.shape[1] != layer.keys.shape[1]
            or key_states.shape[-1] != layer.keys.shape[-1]
        ):
            raise ValueError(
                f"TOVACache layer {layer_idx} holds keys of shape {tuple(layer.keys.shape)} but received "
                f"{tuple(key_states.shape)}: a cache belongs to one model and one batch (use reset() to reuse it)"
            )
        keys, values = layer.update(key_states, value_states)
        set_pending(self, layer_idx)
        return keys, values

    def after_attention(self, module, query, key, attention_mask, scaling, softcap=None, sinks=None) -> None:
        """Called by the attention wrapper once this step's attention of `module`'s layer is computed."""
        owner = id(module.config)
        if self._owner is None:
            self._owner = owner
        elif self._owner != owner:
            raise ValueError(
                "this TOVACache was filled by another model: a cache holds one model's keys (use a new cache, "
                "or reset() this one)"
            )
        layer = self.layers[module.layer_idx]
        window = getattr(module, "sliding_window", None)
        if window is not None and window <= self.budget:
            layer.is_sliding = True  # transformers builds sliding masks from the first layer flagged so
            if layer.physical_length > window - 1:
                keep = torch.arange(layer.physical_length - window + 1, layer.physical_length, device=key.device)
                layer.keep(keep.expand(layer.positions.shape[0], -1))
            return
        if layer.physical_length <= self.budget:
            return
        scores = last_query_scores(module, query, key, attention_mask, scaling, softcap, sinks)
        layer.keep(self._kept_slots(scores, layer.positions))

    def _kept_slots(self, scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Sorted slot indices [B, budget] that survive. Ties evict the highest slot first."""
        real = scores > float("-inf")
        if self.policy == "window":
            scores = torch.where(real, positions.float(), float("-inf"))
        if self.num_sink_tokens:
            sink = real & (real.cumsum(-1) <= self.num_sink_tokens)
            scores = scores.masked_fill(sink, float("inf"))
        slots = scores.shape[-1]
        ascending = torch.sort(scores.flip(-1), dim=-1, stable=True).indices  # ties: higher slot first
        kept = slots - 1 - ascending[:, slots - self.budget :]
        return kept.sort(dim=-1).values

    def update_conv_state(self, *args, **kwargs):
        raise TypeError(_NO_ATTENTION_ERROR)

    def update_recurrent_state(self, *args, **kwargs):
        raise TypeError(_NO_ATTENTION_ERROR)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if layer_idx < len(self.layers):
            return self.layers[layer_idx].get_mask_sizes(query_length)
        return query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Input columns held by layer `layer_idx`, per row ([B, n], in cache order)."""
        return self.layers[layer_idx].positions

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held."""
        return sum(layer.nbytes for layer in self.layers)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self._owner = None

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(_CROP_ERROR)


__all__ = ["TOVACache", "TOVALayer"]
