"""The forced cache of the selection-or-states studies (``studies.memory.forced_selection``,
``studies.long_context.forced``): a whole prefill's keys and values pruned to another run's choice."""

from __future__ import annotations

import pytest
import torch

import chunkkv
from chunkkv import ChunkKV
from chunkkv.methods import make_method
from studies.memory.forced_selection import pruned_like

from models import random_prompt, tiny_model


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_forcing_one_shots_own_choice_on_the_whole_prefill_is_one_shot(family):
    # One-shot keeps the whole prefill's keys at the positions it chose, so forcing its choice on the
    # full cache must give it back exactly: same positions, same keys, same continuation.
    # Gemma's sliding layers (window 16) stay stock in both caches, as at 32k on the real model
    model = tiny_model(family, **({"sliding_window": 16} if family == "gemma3" else {}))
    ids, q = random_prompt(length=90, seed=3), random_prompt(1, 5, seed=4)
    one_shot = chunkkv.compress(model, ids, method=ChunkKV(keep_tokens=30, window=6, chunk_size=4))
    full = chunkkv.compress(model, ids, method=make_method("full"))
    forced = pruned_like(full, one_shot)
    assert one_shot.cache.pruned_layers
    for i in one_shot.cache.pruned_layers:
        assert torch.equal(forced.kept_positions(i), one_shot.kept_positions(i))
        torch.testing.assert_close(forced.cache.layers[i].keys, one_shot.cache.layers[i].keys)
    torch.testing.assert_close(chunkkv.extend(model, forced, q), chunkkv.extend(model, one_shot, q))


def test_forcing_a_chunked_runs_choice_keeps_its_positions_and_the_whole_prefills_states():
    model = tiny_model("llama")
    ids = random_prompt(length=90, seed=3)
    chunked = chunkkv.compress(model, ids, method=ChunkKV(keep_tokens=30, window=6, chunk_size=4), prefill_chunk=30)
    full = chunkkv.compress(model, ids, method=make_method("full"))
    forced = pruned_like(full, chunked)
    for i in chunked.cache.pruned_layers:
        kept = chunked.kept_positions(i)
        assert torch.equal(forced.kept_positions(i), kept)
        whole = full.cache.layers[i].keys[..., kept, :]  # a full cache's slots are the prompt positions
        torch.testing.assert_close(forced.cache.layers[i].keys, whole)
    # the chunked run's own keys were computed over what was held, so past the first chunk they differ
    last = chunked.cache.pruned_layers[-1]
    assert not torch.allclose(forced.cache.layers[last].keys, chunked.cache.layers[last].keys)
    # and the full context itself is left whole
    assert full.cache.layers[last].keys.shape[-2] == 90


def test_forcing_a_compressed_sliding_layer_on_a_stock_one_is_refused():
    # window 4096 holds the 90-token prompt: one-shot compresses the sliding layers, the full cache
    # keeps them stock, and there is no whole-prompt layer to prune
    model = tiny_model("gemma3")
    ids = random_prompt(length=90, seed=3)
    one_shot = chunkkv.compress(model, ids, method=ChunkKV(keep_tokens=30, window=6, chunk_size=4))
    full = chunkkv.compress(model, ids, method=make_method("full"))
    with pytest.raises(ValueError, match="sliding window"):
        pruned_like(full, one_shot)
