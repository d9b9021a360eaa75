"""`TOVACache`: a fixed-budget KV cache for any Hugging Face decoder (Token Omission Via Attention,
arXiv 2401.06104).

After each step's attention, a layer holding more than `budget` tokens drops, per batch row, the tokens
the current query attended to least (softmax probability averaged over all query heads; one index set
per layer and row, shared by all KV heads). A prompt longer than the budget is compressed in one shot by
the last prompt token's scores. Keys are stored after RoPE and never re-rotated; positions keep growing.

transformers contract for a cache shorter than what it has seen: `get_seq_length()` is the number of
tokens seen; `get_mask_sizes(q)` is `(physical + q, seen - physical)`: the kept slots take the last
logical indices. Left padding stays a contiguous block on the left (pads score -inf; a prompt is compressed
by an order-preserving compaction, a decode step by a swap-remove that drops the highest pad first), so the
padding mask keeps lining up.

A decode step has a fixed shape (budget + 1 slots under the cache's own mask, see `TOVALayer`), writes the same
buffers every step and reads no host count: `generate` compiles it and replays it as a CUDA graph on CUDA (the cache
is compileable), and a hand-captured step replays too (pass `position_ids` as a device tensor updated in place).
Steps run that way advance the device alone; the host's counts catch up when next read (one synchronisation).
"""

from __future__ import annotations

import sys
import weakref

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import tova_ops
from .tova_attention import install_attention_hooks, set_pending
from .tova_ops import KERNEL_BACKENDS, POLICIES, kept_slots, last_mask_row, last_query_scores, victims


class TOVALayer(DynamicLayer):
    """One layer's keys/values `[B, H_kv, n, d]` plus `positions` `[B, n]`: the input column of each slot.

    They are views of the first n slots of buffers with room for more (at least `reserve` slots: the budget plus the
    next token), so a step writes its tokens in place instead of re-allocating the cache.

    A decode step (one token, no gradient) of a full-attention layer whose buffers hold exactly `reserve` slots has a
    fixed shape: it attends over all `reserve` slots, the new token goes into the first free slot (the spare last
    slot once the layer is full), and the eviction always runs. Free slots hold position -1 and are hidden by the
    layer's own mask (`slot_mask`), so while the layer is not full the eviction picks the free spare slot: a no-op.
    Its tensors, their addresses and the slot to write (`_held`, on the device) do not depend on the host: the step
    can be compiled and replayed as a CUDA graph. Compiled steps advance the device alone; the host's counts follow
    on their next read (`sync`, one host synchronisation).
    """

    is_croppable = False
    is_compileable = True

    def __init__(self, reserve: int = 0) -> None:
        super().__init__()
        self._seen = 0
        self.reserve = reserve
        self.positions: torch.Tensor | None = None
        self._buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # On the device, so that compiled and captured steps advance them: tokens seen (the next position), slots
        # held, and per row the first input column that is not padding (left padding: every earlier column is).
        self._next_position: torch.Tensor | None = None
        self._held: torch.Tensor | None = None
        self._first_real: torch.Tensor | None = None
        self._device_ahead = False  # compiled steps ran since the host last read the counts
        self.fixed_step = False  # whether the current step has a fixed shape

    @property
    def seen(self) -> int:
        self.sync()
        return self._seen

    def sync(self) -> None:
        """Brings the host's counts and views up to date after compiled decode steps."""
        if self._device_ahead:
            self._device_ahead = False
            self._seen, held = torch.stack([self._next_position, self._held]).tolist()
            self._set_views(held)

    def takes_fixed_shape_step(self, query_length: int) -> bool:
        """Whether a call of `query_length` tokens is a fixed-shape decode step (see the class docstring)."""
        return (
            query_length == 1
            and not torch.is_grad_enabled()
            and not self.is_sliding
            and self._buffers is not None
            and self._buffers[2].shape[-1] == self.reserve
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        self.fixed_step = self.takes_fixed_shape_step(new)
        if self.fixed_step:
            return self._fixed_shape_update(key_states, value_states)
        held = self.physical_length
        grad = torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad)
        if self._buffers is None or held + new > self._buffers[2].shape[-1] or grad:  # autograd: never in place
            previous = (self.keys, self.values, self.positions)
            self._hold(self._new_buffers(key_states, value_states, held + new), held)
            if held:
                for tensor, kept in zip((self.keys, self.values, self.positions), previous):
                    tensor.copy_(kept)
        self._hold(self._buffers, held + new)
        self.keys.narrow(2, held, new).copy_(key_states)
        self.values.narrow(2, held, new).copy_(value_states)
        device = self.positions.device
        if self._next_position is None:
            self._next_position = static_buffer(torch.tensor(self._seen, device=device))
            self._first_real = static_buffer(torch.zeros(key_states.shape[0], dtype=torch.long, device=device))
        column = self._next_position if new == 1 else self._next_position + torch.arange(new, device=device)
        self.positions.narrow(1, held, new).copy_(column)
        self._next_position += new
        self._seen += new
        return self.keys, self.values

    def _fixed_shape_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        keys, values, positions = self._buffers
        slot = self._held.clamp(max=self.reserve - 1).view(1)  # the first free slot, or the spare one when full
        keys.index_copy_(2, slot, key_states)
        values.index_copy_(2, slot, value_states)
        positions.index_copy_(1, slot, self._next_position.view(1, 1).expand(positions.shape[0], 1))
        self._next_position += 1
        self._held += 1
        return keys, values

    def slot_mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """Which of the `reserve` slots a fixed-shape step attends to [B, reserve] (bool): held tokens that are not
        padding (nor, for a layer with a sliding window longer than the budget, out of the window)."""
        positions = self._buffers[2]
        visible = positions >= self._first_real[:, None]
        if sliding_window is not None:  # the query is at position `_next_position - 1`
            visible &= positions > self._next_position - 1 - sliding_window
        return visible

    def note_padding(self, visible: torch.Tensor) -> None:
        """Records, from the last query's mask row over the held slots [B, n] (True = attended), each row's first
        real input column: the slots of earlier columns are padding."""
        unseen = torch.iinfo(torch.long).max
        self._first_real.copy_(self.positions.masked_fill(~visible, unseen).amin(-1))

    def finish_fixed_step(self, victim: torch.Tensor | None = None) -> None:
        """Ends a fixed-shape step: each row's `victim` slot [B] (None: already done by the kernel) receives the last
        slot's key, value and position; the held count returns to at most the budget."""
        if victim is not None:
            for tensor, dim in zip(self._buffers, (2, 2, 1)):
                source = tensor.narrow(dim, self.reserve - 1, 1).clone()  # scatter_ refuses a source inside its target
                index = victim.long().view(-1, *[1] * (tensor.dim() - 1)).expand_as(source)
                tensor.scatter_(dim, index, source)
        self._held.clamp_(max=self.reserve - 1)
        if torch.compiler.is_compiling() or _capturing(self._held):
            self._device_ahead = True  # replays advance the device alone
        else:
            self._seen += 1
            self._set_views(min(self.positions.shape[-1] + 1, self.reserve - 1))

    def _new_buffers(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> tuple[torch.Tensor, ...]:
        """Keys, values and positions for `length` slots, at least `reserve`. Free slots hold zeros (a fixed-shape
        step reads them under a mask: uninitialised memory could hold NaN, which a zero weight does not cancel) and
        position -1."""
        capacity = max(length, self.reserve)
        batch, heads = keys.shape[:2]
        return tuple(
            static_buffer(t)
            for t in (
                keys.new_zeros(batch, heads, capacity, keys.shape[-1]),
                values.new_zeros(batch, heads, capacity, values.shape[-1]),
                torch.full((batch, capacity), -1, dtype=torch.long, device=keys.device),
            )
        )

    def _hold(self, buffers: tuple[torch.Tensor, ...], length: int) -> None:
        """Holds the first `length` slots of `buffers` (keys, values, positions)."""
        self._buffers = buffers
        self._set_views(length)
        if self._held is None:
            self._held = static_buffer(torch.tensor(length, device=buffers[0].device))
        else:
            self._held.fill_(length)

    def _set_views(self, length: int) -> None:
        keys, values, positions = self._buffers
        self.keys, self.values, self.positions = (
            keys.narrow(2, 0, length),
            values.narrow(2, 0, length),
            positions.narrow(1, 0, length),
        )

    def retract(self, count: int) -> None:
        """Undoes the last `update`, of `count` tokens after earlier ones (before its eviction): a refused call
        leaves no trace."""
        self._hold(self._buffers, self.physical_length - count)
        self._seen -= count
        self._next_position -= count

    def drop_last(self) -> None:
        """Forgets the last slot (the Triton eviction already moved it into the victim's slot)."""
        self._hold(self._buffers, self.physical_length - 1)

    def swap_remove(self, victim: torch.Tensor) -> None:
        """Evicts slot `victim[b]` of each row b [B]: it receives the row's last slot (keys and values of every
        KV head, position), then the last slot is dropped. Moves O(heads x d) per row instead of a shift."""
        last = self.physical_length - 1
        out_of_place = torch.is_grad_enabled() and (self.keys.requires_grad or self.values.requires_grad)
        moved = []
        for tensor, dim in ((self.keys, 2), (self.values, 2), (self.positions, 1)):
            source = tensor.narrow(dim, last, 1).clone()  # scatter_ refuses a source inside its destination
            index = victim.long().view(-1, *[1] * (tensor.dim() - 1)).expand_as(source)
            moved.append(tensor.scatter(dim, index, source) if out_of_place else tensor.scatter_(dim, index, source))
        self._hold(tuple(moved) if out_of_place else self._buffers, last)

    @property
    def physical_length(self) -> int:
        self.sync()
        return 0 if self.positions is None else self.positions.shape[-1]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.takes_fixed_shape_step(query_length):  # every slot, under the layer's own mask
            return self.reserve, max(self.seen + 1 - self.reserve, 0)
        return self.physical_length + query_length, self.seen - self.physical_length

    def keep(self, index: torch.Tensor) -> None:
        """Keeps the slots `index` [B, n'] (sorted: order is preserved)."""
        self.sync()
        gather = index[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        sources = zip(
            (self.keys, self.values, self.positions),
            (2, 2, 1),
            (gather, gather[..., :1].expand(-1, -1, -1, self.values.shape[-1]), index),
        )
        if torch.is_grad_enabled() and (self.keys.requires_grad or self.values.requires_grad):  # out= records no graph
            self._hold(tuple(torch.gather(*source) for source in sources), index.shape[-1])
            return
        sources = tuple(sources)
        self._hold(self._new_buffers(self.keys, self.values, index.shape[-1]), index.shape[-1])
        for out, source in zip((self.keys, self.values, self.positions), sources):  # straight into the new buffers
            torch.gather(*source, out=out)

    def reset(self) -> None:
        super().reset()
        self._seen = 0
        self.positions = None
        self._buffers = self._next_position = self._held = self._first_real = None
        self._device_ahead = self.fixed_step = False

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(_CROP_ERROR)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.positions is not None:
            held = self.physical_length
            self._first_real = static_buffer(self._first_real.repeat_interleave(repeats, dim=0))
            self._hold(tuple(static_buffer(t.repeat_interleave(repeats, dim=0)) for t in self._buffers), held)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Selects rows in place: compiled steps find their tensors where they were (beams reorder every step)."""
        if self.positions is not None:
            for tensor in (*self._buffers, self._first_real):
                tensor.copy_(tensor.index_select(0, indices.to(tensor.device)))

    @property
    def nbytes(self) -> int:
        if self.positions is None:
            return 0
        self.sync()
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


def _slot_mask_for(kind: str | None, visible: torch.Tensor, dtype: torch.dtype):
    """A fixed-shape step's mask of its slots `visible` [B, n] in the form the attention `kind` takes: 2-D for flash,
    boolean [B, 1, 1, n] for sdpa, additive for the others (eager and flex add it to the logits)."""
    if kind == "flash":
        return visible
    visible = visible[:, None, None, :]
    if kind == "sdpa":
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


# Copied from ttt_hf.ttt.cache_ttt.static_buffer
def static_buffer(t: torch.Tensor) -> torch.Tensor:
    """Marks a cache tensor as having a fixed address for `torch.compile`: a compiled decoding step updates it in
    place, and a CUDA graph replays it without copying it in and out (transformers' `StaticCache` does the same)."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)
    return t


def _capturing(tensor: torch.Tensor) -> bool:
    """Whether this call is being captured into a CUDA graph (work on `tensor`'s device)."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


_CROP_ERROR = (
    "TOVACache cannot be cropped: evicted tokens are gone, so the cache cannot be rolled back. Assisted / "
    "speculative decoding and DoLa need a croppable cache (DynamicCache)."
)


_NO_ATTENTION_ERROR = (
    "TOVACache holds attention keys/values only, and this model has layers without attention (state-space or "
    "linear-attention layers): TOVA does not apply to them"
)


def _calling_module() -> torch.nn.Module | None:
    """The module whose method called `TOVACache.update`: transformers' attention modules call it from their
    forward. Only a method's frame is read (its locals snapshot lives as long as the frame; a plain function's,
    such as a test's, would keep its variables alive)."""
    frame = sys._getframe(2)
    code = frame.f_code
    if code.co_argcount == 0 or code.co_varnames[0] != "self":
        return None
    caller = frame.f_locals.get("self")
    return caller if isinstance(caller, torch.nn.Module) else None


class TOVACache(Cache):
    """Fixed-budget KV cache for any decoder built on transformers' attention interface.

    ```python
    import ttt_hf
    cache = ttt_hf.TOVACache(budget=512)
    out = model.generate(**inputs, cache=cache, max_new_tokens=2000)  # `past_key_values=` before transformers 5.24
    ```

    Args:
        budget: tokens kept per layer and row (the "multi-state size"), >= 1.
        num_sink_tokens: the first real tokens of each row that are never evicted (default 0: the paper
            finds TOVA keeps the first token anyway).
        policy: `"tova"` (evict the least attended token) or `"window"` (evict the oldest: a sliding window,
            which with sink tokens is the "window + sinks" baseline).
        kernel_backend: `"auto"` (Triton kernels on CUDA for the decode step, where one token per row goes: with
            an attention kind that returns no weights (sdpa, flash, flex) one kernel computes the step's attention,
            scores and evicts in a single pass over the keys and values; with "eager" a score-and-evict kernel runs
            after the model's attention; the torch path otherwise), `"triton"` (the kernels wherever they apply,
            also on CPU under `TRITON_INTERPRET=1`) or `"torch"` (always the model's attention and the torch path,
            the numerical definition).

    Sliding-window layers (Mistral, Gemma 2/3, ...) whose window is at most the budget keep their last
    `window - 1` tokens as transformers' own sliding layers do; the budget applies to the others.

    Compiled decoding: the cache is compileable, so on CUDA `generate` compiles its decoding step (prefill stays
    eager) and replays it as a CUDA graph, as for transformers' `StaticCache`: one graph for prompts of any length;
    `disable_compile=True` keeps the steps eager. A decode step attends over `budget + 1` slots from the first
    one (free slots hidden), like a static cache.
    """

    is_compileable = True

    def __init__(
        self, budget: int, num_sink_tokens: int = 0, policy: str = "tova", kernel_backend: str = "auto"
    ) -> None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
        if (
            isinstance(num_sink_tokens, bool)
            or not isinstance(num_sink_tokens, int)
            or not 0 <= num_sink_tokens < budget
        ):
            raise ValueError(f"num_sink_tokens must be an integer in [0, budget), got {num_sink_tokens!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {kernel_backend!r}")
        if kernel_backend == "triton" and tova_ops.tova_evict_one_triton is None:
            raise ImportError("kernel_backend='triton' needs the triton package (pip install triton)")
        super().__init__(layers=[])
        self.budget = budget
        self.num_sink_tokens = num_sink_tokens
        self.policy = policy
        self.kernel_backend = kernel_backend
        # The modules that filled each layer, as seen by `update` (its caller) and by the attention wrapper: a cache
        # holds one model's keys. Weak references, not ids: a dead model's ids can be reused by the next model's.
        self._owners: dict[tuple[str, int], weakref.ref] = {}
        install_attention_hooks()

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(budget={self.budget}, policy={self.policy!r}, "
            f"kernel_backend={self.kernel_backend!r}, layers={len(self.layers)})"
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        caller = None if torch.compiler.is_compiling() else _calling_module()
        if caller is not None:  # refuse another model's keys before writing any
            self._check_owner("update", layer_idx, caller)
        if len(self.layers) <= layer_idx:
            install_attention_hooks()  # attention kinds registered since the cache was made (hub kernels)
            self.layers.extend(TOVALayer(self.budget + 1) for _ in range(layer_idx + 1 - len(self.layers)))
        layer = self.layers[layer_idx]
        held = layer._buffers[0] if layer._buffers is not None else None  # fixed shapes: no guard on the count
        if held is not None and (
            key_states.shape[0] != held.shape[0]
            or key_states.shape[1] != held.shape[1]
            or key_states.shape[-1] != held.shape[-1]
        ):
            raise ValueError(
                f"TOVACache layer {layer_idx} holds keys of shape {tuple(layer.keys.shape)} but received "
                f"{tuple(key_states.shape)}: a cache belongs to one model and one batch (use reset() to reuse it)"
            )
        keys, values = layer.update(key_states, value_states)
        set_pending(self, layer_idx)
        return keys, values

    def attention_mask_for(self, module, query: torch.Tensor, attention_mask, kind: str | None = None):
        """The mask this layer's attention runs with, given transformers' `attention_mask` for the attention `kind`
        ("sdpa", "flash", "flex"; None for others). A fixed-shape decode step attends under the layer's own mask of
        its slots (free slots and padding hidden; see `TOVALayer`), which needs no host count. A call of several
        tokens records each row's padding from its mask, and is refused where the mask hides every row's newest
        token from itself (a host sync, on a used cache only)."""
        layer = self.layers[module.layer_idx]
        if layer.fixed_step:
            return _slot_mask_for(kind, layer.slot_mask(getattr(module, "sliding_window", None)), query.dtype)
        if query.shape[2] == 1:
            return attention_mask
        row = last_mask_row(attention_mask, query.shape[0], query.shape[2], layer.physical_length)
        if row is None:
            return attention_mask
        visible = (row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2).expand(query.shape[0], -1)
        if getattr(module, "sliding_window", None) is None:  # a sliding mask also hides what left the window
            layer.note_padding(visible)
        if layer.seen > query.shape[2] and not bool(visible[:, -1].any()):
            self._refuse_short_mask(module.layer_idx, query.shape[2])
        return attention_mask

    def _refuse_short_mask(self, layer_idx: int, new: int) -> None:
        """Every row's newest token is hidden from itself: the attention mask is shorter than the tokens this cache
        has seen plus the new ones, as when `generate` is handed a used cache with a new prompt (it then keeps only
        the prompt's tail). The layer's update is undone first."""
        layer = self.layers[layer_idx]
        seen = layer.seen - new
        layer.retract(new)
        raise ValueError(
            f"TOVACache has seen {seen} tokens, but the attention mask does not cover them and the {new} new ones: "
            "to continue, pass the whole sequence so far (the tokens this cache has seen, then the new ones) as "
            "input_ids and attention_mask; for a new prompt, use a new cache or call cache.reset()"
        )

    def __getstate__(self) -> dict:
        # The owners are weak references (not picklable) to a live model's modules: a copy starts without them.
        return {**self.__dict__, "_owners": {}}

    def _check_owner(self, where: str, layer_idx: int, module: torch.nn.Module) -> None:
        owner = self._owners.setdefault((where, layer_idx), weakref.ref(module))()
        if owner is not module:
            raise ValueError(
                "this TOVACache was filled by another model: a cache holds one model's keys (use a new cache, "
                "or reset() this one)"
            )

    def fused_attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        scaling: float | None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """This step's attention output [B, 1, Hq, dv] from the Triton kernel that also scores and evicts, or None
        where it does not apply (then the model's attention runs and `after_attention` evicts). Called by the
        attention wrapper for a single query of a kind that returns no weights, without dropout or position bias;
        the kernel applies where `_use_kernel` says so (a decode step at the budget of a full-attention layer)."""
        layer = self.layers[module.layer_idx]
        if query.shape[2] != 1 or getattr(module, "sliding_window", None) is not None:
            return None
        if not self._use_kernel(layer, query, key, sinks, value):
            return None
        if not torch.compiler.is_compiling():
            self._check_owner("attention", module.layer_idx, module)
        if layer.fixed_step:
            attention_mask = layer.slot_mask()[:, None, None, :]
        return self._kernel_step(layer, query, attention_mask, scaling, softcap, sinks, attend=True)

    def after_attention(self, module, query, key, attention_mask, scaling, softcap=None, sinks=None) -> None:
        """Called by the attention wrapper once this step's attention of `module`'s layer is computed."""
        if not torch.compiler.is_compiling():
            self._check_owner("attention", module.layer_idx, module)
        layer = self.layers[module.layer_idx]
        window = getattr(module, "sliding_window", None)
        if window is not None and window <= self.budget:
            layer.is_sliding = True  # transformers builds sliding masks from the first layer flagged so
            if layer.physical_length > window - 1:
                keep = torch.arange(layer.physical_length - window + 1, layer.physical_length, device=key.device)
                layer.keep(keep.expand(layer.positions.shape[0], -1))
            return
        if layer.fixed_step:
            mask = layer.slot_mask(window)[:, None, None, :]
            if self._use_kernel(layer, query, key, sinks):
                self._kernel_step(layer, query, mask, scaling, softcap, sinks, attend=False)
                return
            scores = last_query_scores(module, query, key, mask, scaling, softcap, sinks)
            layer.finish_fixed_step(victims(scores, layer._buffers[2], self.policy, self.num_sink_tokens))
            return
        if layer.physical_length <= self.budget:
            return
        if self._use_kernel(layer, query, key, sinks):
            self._kernel_step(layer, query, attention_mask, scaling, softcap, sinks, attend=False)
            return
        scores = last_query_scores(module, query, key, attention_mask, scaling, softcap, sinks)
        if layer.physical_length == self.budget + 1:  # one slot per row goes: as the kernel does
            layer.swap_remove(victims(scores, layer.positions, self.policy, self.num_sink_tokens))
        else:
            layer.keep(kept_slots(scores, layer.positions, self.budget, self.policy, self.num_sink_tokens))

    def _kernel_step(self, layer: TOVALayer, query, attention_mask, scaling, softcap, sinks, attend: bool):
        """The Triton decode step on `layer` (budget + 1 slots): evicts one slot per row and, with `attend`, returns
        the last query's attention output computed in the same pass."""
        if layer.fixed_step:
            keys, values, positions = layer._buffers
        else:
            keys, values, positions = layer.keys, layer.values, layer.positions
        output = tova_ops.evict_one_triton(
            query,
            keys,
            values,
            positions,
            attention_mask,
            scaling,
            softcap,
            sinks,
            self.num_sink_tokens,
            self.policy,
            attend,
        )
        if layer.fixed_step:
            layer.finish_fixed_step()
        else:
            layer.drop_last()
        return output

    def _use_kernel(self, layer: TOVALayer, query, key, sinks, value=None) -> bool:
        """Whether a Triton kernel evicts this step (see `tova_ops.use_decode_kernel`): one slot per row to drop, as
        in a decode step; a longer prompt is compressed by the torch path."""
        if layer.fixed_step:
            return tova_ops.use_decode_kernel(self.kernel_backend, True, query, key, *layer._buffers[:2], sinks, value)
        at_budget = layer.physical_length == self.budget + 1
        return tova_ops.use_decode_kernel(
            self.kernel_backend, at_budget, query, key, layer.keys, layer.values, sinks, value
        )

    def update_conv_state(self, *args, **kwargs):
        raise TypeError(_NO_ATTENTION_ERROR)

    def update_recurrent_state(self, *args, **kwargs):
        raise TypeError(_NO_ATTENTION_ERROR)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if query_length == 0:  # transformers asks before any layer runs: the one place that sees an empty call
            raise ValueError(
                f"TOVACache got no new tokens: a call needs at least one. After a used cache (it has seen "
                f"{self.get_seq_length(layer_idx)} tokens), generate takes the whole sequence so far, then the new "
                "tokens; for a new prompt, use a new cache or call cache.reset()"
            )
        if layer_idx < len(self.layers):
            return self.layers[layer_idx].get_mask_sizes(query_length)
        return query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Input columns held by layer `layer_idx`, per row ([B, n], in cache order: not sorted once a decode
        step has evicted, since the newest token takes the evicted slot; sort them to compare sets)."""
        layer = self.layers[layer_idx]
        layer.sync()
        return layer.positions

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held."""
        return sum(layer.nbytes for layer in self.layers)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self._owners = {}

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(_CROP_ERROR)


__all__ = ["TOVACache", "TOVALayer"]
