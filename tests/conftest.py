import os

import pytest
import torch

# Tiny models: one thread is faster than two fighting over 2 cores (and than oversubscribing
# alongside loader workers). Subprocesses started by tests inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from m3ae import M3AE, M3AEConfig  # noqa: E402  (after the thread setting above)


def nano_config(**overrides) -> M3AEConfig:
    base = dict(image_size=32, patch_size=8, vocab_size=40, text_length=16)
    return M3AEConfig.from_preset("nano", **{**base, **overrides})


@pytest.fixture
def nano_model() -> M3AE:
    torch.manual_seed(0)
    return M3AE(nano_config())


def random_batch(batch=4, length=12, vocab=40, image_size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, image_size, image_size, generator=g)
    text = torch.randint(2, vocab, (batch, length), generator=g)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length
    padding = torch.arange(length)[None, :] >= lengths[:, None]
    text = text.masked_fill(padding, 0)
    return image, text, padding
