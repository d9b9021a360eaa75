"""`TTTCache`: the recurrent state of a TTT model, as a `transformers.Cache`."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

# What the cached tensors depend on: a model that differs in any of these cannot continue from the cache.
ARCHITECTURE_FIELDS = (
    "ttt_layer_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "mini_batch_size",
    "pre_conv",
    "share_qk",
    "conv_kernel",
)


def architecture_of(config) -> dict:
    return {name: getattr(config, name) for name in ARCHITECTURE_FIELDS}


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


def static_buffer(t: torch.Tensor) -> torch.Tensor:
    """Marks a cache tensor as having a fixed address for `torch.compile`: a compiled decoding step updates it in
    place, and a CUDA graph replays it without copying it in and out (transformers' `StaticCache` does the same)."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)
    return t


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


class TTTLayerCache:
    """State of one TTT block: fixed size, whatever the number of tokens seen.

    - `ttt_state`: inner-model parameters at the start of the current mini-batch, `[W1, c1, (W2, c2)]`,
      fp32 `[B, H, ...]`;
    - `ttt_acc`: lr-weighted gradients accumulated over the current mini-batch, same shapes, fp32;
    - `pre_conv_state` / `qk_conv_state`: the last `conv_kernel - 1` inputs of the causal convolutions
      (Mamba backbone), `[B, K-1, hidden]`, in the activation dtype.
    Tensors are allocated by the first forward, on the device and dtype of its activations; later forwards
    write them in place (`store`), so a compiled decoding step finds them at the same address.
    """

    is_compileable = True
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self) -> None:
        self.ttt_state: list[torch.Tensor] | None = None
        self.ttt_acc: list[torch.Tensor] | None = None
        self.pre_conv_state: torch.Tensor | None = None
        self.qk_conv_state: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(initialized={self.ttt_state is not None})"

    def store_state(self, state: list[torch.Tensor], acc: list[torch.Tensor]) -> None:
        if self.ttt_state is None:
            self.ttt_state, self.ttt_acc = [None] * len(state), [None] * len(acc)
        self.ttt_state = [store(old, new) for old, new in zip(self.ttt_state, state)]
        self.ttt_acc = [store(old, new) for old, new in zip(self.ttt_acc, acc)]

    def _map(self, fn) -> None:
        if self.ttt_state is not None:
            self.ttt_state = [fn(t) for t in self.ttt_state]
            self.ttt_acc = [fn(t) for t in self.ttt_acc]
        if self.pre_conv_state is not None:
            self.pre_conv_state = fn(self.pre_conv_state)
        if self.qk_conv_state is not None:
            self.qk_conv_state = fn(self.qk_conv_state)

    def reset(self) -> None:
        self.__init__()

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
        tensors = (self.ttt_state or []) + (self.ttt_acc or [])
        tensors += [t for t in (self.pre_conv_state, self.qk_conv_state) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


_CROP_ERROR = (
    "TTTCache cannot be cropped: the TTT state is a model trained on every token seen, it cannot be rolled "
    "back. Assisted/speculative decoding and DoLa need a croppable cache; re-run the prefill instead."
)


def check_batch_indices(indices: torch.Tensor, batch_size: int) -> None:
    """Rows a `batch_select_indices` may keep: [-B, B), as indexing allows."""
    indices = torch.as_tensor(indices)
    if indices.numel() and (indices.min() < -batch_size or indices.max() >= batch_size):
        raise IndexError(
            f"batch_select_indices: indices must lie in [0, {batch_size}) (the cache's batch size), "
            f"got {indices.tolist()}"
        )


class TTTCache(Cache):
    """Recurrent cache of [`TTTForCausalLM`]: per layer a [`TTTLayerCache`], plus per-row positions.

    Its size does not depend on the number of tokens seen. `positions[r]` counts the real (non-padding)
    tokens row r has consumed: it sets where the next token falls inside its TTT mini-batch.
    `get_seq_length()` counts input columns, padding included, as `generate` expects. Both counters live on the
    device and are updated in place, so that a decoding step has no host synchronisation and compiles once:
    `generate` on CUDA compiles its decoding step and replays it as a CUDA graph, as it does for `StaticCache`.

    ```python
    cache = TTTCache(model.config)
    out = model(prompt_ids, cache=cache)         # prefill (any length)
    out = model(more_ids, cache=out.cache)       # continue with any number of tokens
    ```
    """

    def __init__(self, config, **kwargs) -> None:
        super().__init__(layers=[TTTLayerCache() for _ in range(config.num_hidden_layers)])
        self.architecture = architecture_of(config)
        self.positions: torch.Tensor | None = None  # [B] int64
        self.columns: torch.Tensor | None = None  # [] int64: input columns seen, padding included

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(layers={len(self.layers)}, seen_tokens={self.seen_tokens})"

    def row_positions(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Absolute position of the next token of each row ([B] int64)."""
        if self.positions is None:
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        if self.positions.shape[0] != batch_size:
            raise ValueError(
                f"TTTCache holds state for batch size {self.positions.shape[0]}, but the input has batch size "
                f"{batch_size}: use a new cache, or `batch_repeat_interleave`/`batch_select_indices` to reshape it"
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
        """Bytes held by the cache (independent of the sequence length)."""
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


__all__ = ["TTTCache", "TTTLayerCache", "check_architecture"]
