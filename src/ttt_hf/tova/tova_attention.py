"""The score path of TOVA: what the current query's attention over the cache actually was.

`transformers` attention modules call the cache's `update(...)` (no query) and then the attention
function registered for the model's `attn_implementation`. On first use, TOVA wraps the registered
functions ("eager", "sdpa", flash/flex kinds). When the TOVA cache just updated this module's layer:
- a decode step at the budget of transformers' own sdpa, flash or flex attention (they return no attention
  weights; hub flash kernels use the same function) can be fused:
  the cache's Triton kernel computes the attention output, scores and evicts in one pass over the keys and
  values (`TOVACache.fused_attention`), and the original function does not run;
- otherwise the original function runs unchanged, then the last query's softmax over the cached keys is
  computed exactly as attention did (the module's `scaling`, soft-capping, attention sinks, the mask) and
  handed to the cache, which evicts.
Nothing in the model, its code or its `attn_implementation` changes.
"""

from __future__ import annotations

import sys
import threading
import weakref

import torch
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_pending = threading.local()


def set_pending(cache, layer_idx: int) -> None:
    """Called by the cache's `update`: the next attention call of this layer belongs to `cache`. A weak reference:
    an update that no attention call follows (an exception in between, a cache filled by hand) must not keep the
    cache and its tensors alive."""
    _pending.value = (weakref.ref(cache), layer_idx)


def _take_pending(module):
    pending = getattr(_pending, "value", None)
    if pending is None or pending[1] != getattr(module, "layer_idx", None):
        return None
    _pending.value = None
    return pending[0]()


# transformers' own implementations of the attention kinds whose output is all a caller gets (no probabilities to
# read; flex's second output is its log-sum-exp, not weights), so the fused kernel may stand in for them. Hub
# flash kernels register `flash_attention_forward` itself. Anything else (eager, the paged kinds of continuous
# batching, a user's function under whatever name) keeps its own attention: its semantics are unknown.
_FUSABLE_KINDS = {sdpa_attention_forward: "sdpa", flash_attention_forward: "flash", flex_attention_forward: "flex"}


def _fusable_call(function, module, query: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether the call of the attention `function` computes plain softmax attention of one query, which the fused
    kernel reproduces: no dropout, sliding window, position bias or packed sequences. SDPA applies neither
    soft-capping nor sinks."""
    kind = _FUSABLE_KINDS.get(function)
    if kind is None or args or query.shape[2] != 1 or module.training:
        return False
    if kwargs.get("dropout", 0.0) != 0 or getattr(module, "sliding_window", None) is not None:
        return False
    unsupported = ("sliding_window", "position_bias", "cu_seq_lens_q", "cu_seq_lens_k")
    if any(kwargs.get(key) is not None for key in unsupported):
        return False
    return kind != "sdpa" or (kwargs.get("softcap") is None and kwargs.get("s_aux") is None)


def _wrap(original):
    def tova_aware_attention(module, query, key, value, attention_mask, *args, **kwargs):
        # "eager" is not in the registry: each model file defines its own eager function.
        function = original or getattr(sys.modules[type(module).__module__], "eager_attention_forward")
        cache = _take_pending(module)
        if cache is None:
            return function(module, query, key, value, attention_mask, *args, **kwargs)
        mask = cache.attention_mask_for(module, query, attention_mask, _FUSABLE_KINDS.get(original))
        scaling = kwargs.get("scaling", getattr(module, "scaling", None))
        softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
        if _fusable_call(original, module, query, args, kwargs):
            output = cache.fused_attention(module, query, key, value, mask, scaling, softcap, sinks)
            if output is not None:
                return output, None
        output = function(module, query, key, value, mask, *args, **kwargs)
        cache.after_attention(module, query, key, attention_mask, scaling, softcap, sinks)
        return output

    tova_aware_attention.tova_original = original
    return tova_aware_attention


def install_attention_hooks() -> None:
    """Wraps every registered attention function not yet wrapped (kinds registered later, such as hub
    kernels, are wrapped on the next call). The wrappers are transparent when no TOVA cache is involved."""
    for name in {"eager", *ALL_ATTENTION_FUNCTIONS.keys()}:
        original = ALL_ATTENTION_FUNCTIONS.get(name)
        if hasattr(original, "tova_original"):
            continue
        ALL_ATTENTION_FUNCTIONS.register(name, _wrap(original))
