"""Device memory: a batch the device cannot hold is split in half and retried (not a failed shard), and the
GPU token budget is sized from free memory.

The out-of-memory error is torch's own ``torch.OutOfMemoryError``, raised from a forward pre-hook on the
model for batches wider than a limit: on this CPU-only machine that is the one way to make the real
encoder meet it; everything else (tokenizing, padding, the model, the vectors) is the real path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.model import load_encoder
from pipeline.model.encoder import MAX_DEVICE_BATCH_TOKENS, MIN_DEVICE_BATCH_TOKENS, device_batch_tokens
from tests.support.float32 import forward_error
from tests.support.tiny_models import build_tiny_model, mixed_texts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("oom") / "tiny")


def limit_device(encoder, max_padded_tokens: int) -> list[int]:
    """Make every forward wider than ``max_padded_tokens`` fail as a full device would; returns the widths
    of the batches that ran."""
    ran: list[int] = []

    def hook(_module, args):
        width = int(args[0]["input_ids"].numel())
        if width > max_padded_tokens:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {width} tokens)")
        ran.append(width)

    encoder.chain.register_forward_pre_hook(hook)
    return ran


def test_out_of_memory_batches_are_halved_and_give_the_same_vectors(model_dir: Path) -> None:
    texts = mixed_texts(120, seed=3, max_chars=600)
    want = load_encoder(model_dir, device="cpu").encode(texts, max_batch_tokens=4096)
    encoder = load_encoder(model_dir, device="cpu")
    ran = limit_device(encoder, 700)
    got = encoder.encode(texts, max_batch_tokens=4096)
    # Other batch compositions: equal up to the float32 bound of two forward passes, row by row.
    excess = np.abs(got.astype(np.float64) - want.astype(np.float64)) - forward_error(want, model_dir)
    assert excess.max() <= 0, f"off by up to {excess.max():g} beyond float32 rounding"
    assert encoder.counters.oom_splits > 0 and encoder.counters.texts == len(texts)
    assert max(ran) <= 700
    # The cap learned from the first split holds for the rest of the run: later wide batches are split up
    # front instead of failing again.
    assert encoder.oom_cap is not None and encoder.oom_cap <= 700 * 2
    splits = encoder.counters.oom_splits
    again = encoder.encode(texts, max_batch_tokens=4096)
    np.testing.assert_array_equal(again, got)
    assert encoder.counters.oom_splits - splits <= 1


def test_one_text_too_wide_for_the_device_is_a_clear_error(model_dir: Path) -> None:
    encoder = load_encoder(model_dir, device="cpu")
    limit_device(encoder, 4)
    with pytest.raises(torch.OutOfMemoryError, match=r"one text of \d+ tokens does not fit"):
        encoder.encode(["a sentence long enough to need more than four tokens"], max_batch_tokens=4096)


def test_token_budget_from_free_memory() -> None:
    per_token = (3072 + 6 * 768) * 2  # bert-base in half precision
    assert device_batch_tokens(2 * 2**30, per_token) == 32768
    assert device_batch_tokens(8 * 2**30, per_token) == 131072
    assert device_batch_tokens(140 * 2**30, per_token) == MAX_DEVICE_BATCH_TOKENS
    assert device_batch_tokens(100 * 2**20, per_token) == MIN_DEVICE_BATCH_TOKENS
    budget = device_batch_tokens(3 * 2**30, per_token)
    assert budget & (budget - 1) == 0 and budget * per_token <= 0.4 * 3 * 2**30
