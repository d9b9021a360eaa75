"""`BlockStateCache`: the generation cache of a Block-State Transformer, as a `transformers.Cache`."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

# What the cached tensors depend on: a model that differs in any of these cannot continue from the cache.
ARCHITECTURE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "block_size",
    "attend_previous_block",
    "context_mode",
    "ssm_kind",
    "ssm_state_size",
    "num_context_states",
    "ssm_layers",
    "ssm_filter_features",
)


# Copied from ttt_hf.ttt.cache_ttt.architecture_of
def architecture_of(config) -> dict:
    return {name: getattr(config, name) for name in ARCHITECTURE_FIELDS}


# Copied from ttt_hf.ttt.cache_ttt.check_architecture
def check_architecture(cache, config) -> None:
    """Refuses, before anything changes, a model whose architecture differs from the one `cache` was built for."""
    model = architecture_of(config)
    differences = [
        f"{name}={built!r} (this model: {model[name]!r})"
        for name, built in cache.architecture.items()
        if model[name] != built
    ]
    if differences:
        raise ValueError(
            f"This {type(cache).__name__} was built for another architecture: {', '.join(differences)}. Use a cache "
            "made from this model's config."
        )


# Copied from ttt_hf.ttt.cache_ttt.static_buffer
def static_buffer(t: torch.Tensor) -> torch.Tensor:
    """Marks a cache tensor as having a fixed address for `torch.compile`: a compiled decoding step updates it in
    place, and a CUDA graph replays it without copying it in and out (transformers' `StaticCache` does the same)."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)
    return t


# Copied from ttt_hf.ttt.cache_ttt.store
def store(current: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """The cache's tensor after a forward computed `new`: written into `current` in place where shapes and dtypes
    allow (its address stays fixed across decoding steps), else `new` itself as the cache's own tensor. Tensors
    with autograd history are kept as they are, so that a loss may reach back through the cache."""
    if new is current:
        return current
    if new.requires_grad or (current is not None and current.requires_grad):
        return new
    if current is not None and current.shape == new.shape and current.dtype == new.dtype:
        return current.copy_(new)
    # A forward's fresh result becomes the cache's own; a view (the broadcast initial parameters) is copied.
    owned = new.is_contiguous() and new._base is None
    return static_buffer(new if owned else new.clone(memory_format=torch.contiguous_format))


class BlockStateLayerCache:
    """One layer's state; none of it grows with the generated length, except the input history of the
    implicit-filter SSM (which has no finite state: its decoding convolves the whole history).

    Named tensors, batch first, allocated by the first forward on the device of its activations:
    - `ssm_state`: S4D state `[B, F, D, N/2]` complex64 (F filters per feature);
    - `history`: implicit filter only, the SSM inputs seen so far, right-aligned `[B, P, D]` in the model's dtype;
    - `self_k`, `self_v`: the current block's self-attention keys/values `[B, W, H, hd]` (slot = position % W);
    - `prev_k`, `prev_v`: the previous block's, with `attend_previous_block`;
    - `cross_k`, `cross_v`: the current block's context keys/values: `[B, W, H, hd]` (SH/MH, slot = position
      % W) or `[B, H, S, hd]` (MF, computed once per block boundary).
    Later forwards write them in place where their shapes allow (`set`), so a compiled decoding step finds them at
    the same address.
    """

    is_compileable = True  # the layer's buffers; `BlockStateCache.is_compileable` decides for the filter kind
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({sorted(self.tensors)})"

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def set(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = store(self.tensors.get(name), tensor)

    def _map(self, fn) -> None:
        self.tensors = {name: fn(t) for name, t in self.tensors.items()}

    def reset(self) -> None:
        self.tensors = {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # In place: beam search reorders between compiled steps, which must find the same tensors.
        self._map(lambda t: store(t, t.index_select(0, beam_idx.to(t.device))))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: static_buffer(t.repeat_interleave(repeats, dim=0)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: static_buffer(t[indices.to(t.device)]))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(_CROP_ERROR)

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        pass

    def get_max_length(self) -> int:
        return -1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


_CROP_ERROR = (
    "BlockStateCache cannot be cropped: the SSM state has consumed every token and cannot be rolled back. "
    "Assisted/speculative decoding and DoLa need a croppable cache; re-run the prefill instead."
)


# Copied from ttt_hf.ttt.cache_ttt.check_batch_indices
def check_batch_indices(indices: torch.Tensor, batch_size: int) -> None:
    """Rows a `batch_select_indices` may keep: [-B, B), as indexing allows."""
    indices = torch.as_tensor(indices)
    if indices.numel() and (indices.min() < -batch_size or indices.max() >= batch_size):
        raise IndexError(
            f"batch_select_indices: indices must lie in [0, {batch_size}) (the cache's batch size), "
            f"got {indices.tolist()}"
        )


class BlockStateCache(Cache):
    """Generation cache of [`BlockStateForCausalLM`]: per layer a [`BlockStateLayerCache`], plus per-row
    positions (real tokens consumed by each row: they set the block boundaries of each row).

    Its memory does not depend on the generated length (S4D); `get_seq_length()` counts input columns,
    padding included, as `generate` expects. Both counters live on the device and are updated in place: with the
    S4D filter a decoding step has fixed shapes and no host synchronisation, so `generate` on CUDA compiles it and
    replays it as a CUDA graph (the implicit filter's history grows with every token: it decodes eagerly).
    """

    def __init__(self, config, **kwargs) -> None:
        super().__init__(layers=[BlockStateLayerCache() for _ in range(config.num_hidden_layers)])
        self.architecture = architecture_of(config)
        self.positions: torch.Tensor | None = None  # [B] int64
        self.columns: torch.Tensor | None = None  # [] int64: input columns seen, padding included

    @property
    def is_compileable(self) -> bool:
        return self.architecture["ssm_kind"] == "s4d"

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(layers={len(self.layers)}, seen_tokens={self.seen_tokens})"

    def row_positions(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Absolute position of the next token of each row ([B] int64)."""
        if self.positions is None:
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        if self.positions.shape[0] != batch_size:
            raise ValueError(
                f"BlockStateCache holds state for batch size {self.positions.shape[0]}, but the input has batch "
                f"size {batch_size}: use a new cache, or `batch_repeat_interleave`/`batch_select_indices`"
            )
        return self.positions.to(device)

    def advance(self, num_columns: int, lengths: torch.Tensor) -> None:
        """Records that a forward consumed `num_columns` input columns, `lengths[r]` of them real for row r."""
        if self.positions is None:
            self.positions = static_buffer(lengths.clone())
            self.columns = static_buffer(torch.full((), num_columns, dtype=torch.long, device=lengths.device))
        else:
            self.positions.add_(lengths.to(self.positions.device))
            self.columns.add_(num_columns)

    @property
    def seen_tokens(self) -> int:
        return 0 if self.columns is None else int(self.columns)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input columns seen (reads the device counter: one host synchronisation)."""
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.positions is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return sum(layer.nbytes for layer in self.layers)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.positions = None
        self.columns = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions.copy_(self.positions.index_select(0, beam_idx.to(self.positions.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = static_buffer(self.positions.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.positions is not None:
            check_batch_indices(indices, self.positions.shape[0])
        for layer in self.layers:
            layer.batch_select_indices(indices)
        if self.positions is not None:
            self.positions = static_buffer(self.positions[indices.to(self.positions.device)])

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(_CROP_ERROR)


__all__ = ["BlockStateCache", "BlockStateLayerCache", "check_architecture"]
