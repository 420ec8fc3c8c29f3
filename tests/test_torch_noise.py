"""torch's CPU generator reproduced in NumPy: its draws against torch.randn's own.

(The whole pipeline with it against diffusers with the same seeds: tests/test_pipeline.py.)
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from sdport.errors import UsageError
from sdport.runtime.torch_noise import TorchBatchNoise, TorchCPUNoise

torch = pytest.importorskip("torch")

# torch computes Box-Muller in float32 with its own log, sin and cos, sdport in float64 rounded
# to float32: the last bits of a value may differ (1.3e-6 at most seen, on values up to ~5).
ATOL = 4e-6


@pytest.mark.parametrize(
    ("seed", "shape"),
    [
        (0, (1, 4, 64, 64)),  # SD 1.5's latents at 512 px
        (42, (2, 4, 8, 8)),
        (7, (1, 4, 3, 5)),  # 60 values: the last 16 drawn again as one block
        (2**33 + 5, (1, 4, 6, 8)),  # torch's MT19937 keeps the seed's low 32 bits
        (2**64 - 1, (16,)),  # exactly one block
        (123456789, (17,)),
    ],
)
def test_draws_match_torch_randn(seed, shape):
    generator = torch.Generator().manual_seed(seed)
    ours = TorchCPUNoise(seed)
    for _ in range(3):  # each draw continues from the state the last one left
        theirs = torch.randn(shape, generator=generator).numpy()
        drawn = ours.standard_normal(shape)
        assert drawn.dtype == np.float32 and drawn.shape == theirs.shape
        np.testing.assert_allclose(drawn, theirs, atol=ATOL, rtol=0)
    assert ours.standard_normal(shape, dtype=np.float64).dtype == np.float64


def test_a_batch_is_a_generator_per_image_as_diffusers_list_of_generators():
    generators = [torch.Generator().manual_seed(9 + i) for i in range(3)]
    batch = TorchBatchNoise(9, 3)
    for shape in [(3, 4, 8, 8), (3, 4, 8, 8), (3, 4, 2, 10)]:
        theirs = np.concatenate([torch.randn((1, *shape[1:]), generator=g).numpy() for g in generators])
        np.testing.assert_allclose(batch.standard_normal(shape), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TorchCPUNoise(-1), "seed must be an integer in [0, 2^64), got -1"),
        (lambda: TorchCPUNoise(2**64), "seed must be an integer in [0, 2^64)"),
        (lambda: TorchCPUNoise(1.5), "seed must be an integer"),
        (lambda: TorchCPUNoise(0).standard_normal((1, 3, 5)), "a tensor of 15 values (fewer than 16)"),
        (lambda: TorchBatchNoise(0, 2).standard_normal((3, 4, 8, 8)), "shape (3, 4, 8, 8) for a batch of 2 images"),
        (lambda: TorchBatchNoise(2**64 - 1, 2), "seeds 18446744073709551615..18446744073709551616"),
    ],
)
def test_refusals(make, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        make()
