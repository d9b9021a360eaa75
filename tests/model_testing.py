"""Helpers shared by the model tests (TTT and Block-State): reference logits, padding, cache walks."""

from __future__ import annotations

import torch

from ttt_hf import CACHE_NAME


def cache_arg(cache) -> dict:
    """The cache as a keyword argument of `generate` (or of a transformers model's forward) under the running
    release's name: `cache` from 5.24 on, `past_key_values` before. Our models take either name."""
    return {CACHE_NAME: cache}


def returned_cache(output):
    """The cache of a `generate` output, under the running release's name."""
    return getattr(output, CACHE_NAME)


def full_logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits of one forward without a cache."""
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def left_pad(rows: list[torch.Tensor], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one left-padded batch (pad id 0) and its attention mask."""
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = row
        mask[r, width - len(row) :] = 1
    return ids, mask


def prefill_then_decode_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a cached prefill of `prefill` tokens followed by one token at a time."""
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        logits = [out.logits]
        for j in range(prefill, ids.shape[1]):
            out = model(ids[:, j : j + 1], cache=out.cache)
            logits.append(out.logits)
    return torch.cat(logits, 1)


def chunked_logits(model, cache, ids: torch.Tensor, splits) -> torch.Tensor:
    """Logits of feeding `ids` through `cache` in chunks cut at `splits`."""
    bounds = [0, *splits, ids.shape[1]]
    with torch.no_grad():
        return torch.cat([model(ids[:, a:b], cache=cache).logits for a, b in zip(bounds[:-1], bounds[1:])], 1)


def check_cache_batch_operations(model, make_cache, ids: torch.Tensor, more: torch.Tensor):
    """reorder_cache, batch_select_indices, batch_repeat_interleave and reset move every per-row tensor: after
    a prefill of `ids` (3 rows), continuing with `more` from the transformed cache equals transforming the
    continuation's reference. Returns the
    reset cache's `positions` as they were right after `reset()`."""
    with torch.no_grad():

        def fresh():
            cache = make_cache()
            model(ids, cache=cache)
            return cache

        reference = model(more, cache=fresh()).logits
        reordered = fresh()
        reordered.reorder_cache(torch.tensor([2, 0, 1]))
        assert torch.allclose(model(more[[2, 0, 1]], cache=reordered).logits, reference[[2, 0, 1]], atol=1e-6)
        selected = fresh()
        selected.batch_select_indices(torch.tensor([1]))
        assert torch.allclose(model(more[1:2], cache=selected).logits, reference[1:2], atol=1e-6)
        repeated = fresh()
        repeated.batch_repeat_interleave(2)
        out = model(more.repeat_interleave(2, 0), cache=repeated).logits
        assert torch.allclose(out, reference.repeat_interleave(2, 0), atol=1e-6)
        reset = fresh()
        reset.reset()
        assert reset.get_seq_length() == 0
        reset_positions = reset.positions
        assert torch.allclose(model(ids, cache=reset).logits, full_logits(model, ids), atol=1e-6)
    return reset_positions


def check_cuda_matches_cpu_and_decodes(cpu, gpu, ids: torch.Tensor, mask: torch.Tensor, prefill: int) -> None:
    """The CUDA model's full forward matches the CPU's, and its cached prefill + decode matches its full
    forward at every real position (padding included in `mask`)."""
    with torch.no_grad():
        expected = cpu(ids, attention_mask=mask, use_cache=False).logits
        full = gpu(ids.cuda(), attention_mask=mask.cuda(), use_cache=False).logits
        assert (full.cpu() - expected).abs().max().item() <= 1e-4
        out = gpu(ids[:, :prefill].cuda(), attention_mask=mask[:, :prefill].cuda())
        steps = [out.logits]
        for j in range(prefill, ids.shape[1]):
            out = gpu(ids[:, j : j + 1].cuda(), attention_mask=mask[:, : j + 1].cuda(), cache=out.cache)
            steps.append(out.logits)
    real = mask.bool().cuda()
    assert (torch.cat(steps, 1) - full)[real].abs().max().item() <= 1e-4


def check_training_step_is_finite(model, ids: torch.Tensor) -> None:
    """One loss + backward in train mode: finite loss and gradients."""
    model.train()
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def random_ids(batch: int, length: int, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


def check_recomputation_keeps_the_gradients(model, ids: torch.Tensor, modeling, monkeypatch, regions: int) -> dict:
    """One training step with the regions a model file runs through `modeling.checkpoint` recomputed in the
    backward gives bit-identical parameter gradients to one with those regions run as plain calls (their
    activations kept), and the first step ran `regions` of them. Returns the gradients, by parameter name."""

    def gradients():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    calls = []
    real_checkpoint = modeling.checkpoint
    with monkeypatch.context() as patched:
        patched.setattr(modeling, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
        recomputed = gradients()
        patched.setattr(modeling, "checkpoint", lambda fn, *args, use_reentrant: fn(*args))
        kept = gradients()
    assert len(calls) == regions
    assert recomputed.keys() == kept.keys()
    for name, grad in kept.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=0, atol=0, msg=name)
    return kept
