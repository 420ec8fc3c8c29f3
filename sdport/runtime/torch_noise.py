"""torch's CPU generator reproduced in NumPy (torch is never imported): diffusers' seeds.

    rng = TorchCPUNoise(42)                   # torch.Generator("cpu").manual_seed(42)
    rng.standard_normal((1, 4, 64, 64))       # torch.randn((1, 4, 64, 64), generator=g), float32

diffusers draws every random tensor of a pipeline call with `torch.randn(..., generator=g)`:
the starting latents, the VAE's latent sample of image-to-image, and each stochastic scheduler
step's noise, in that order. The schedulers and the pipeline ask for the same tensors in the same
order, so with this source sdport starts from, and goes on with, the noise diffusers uses for
the same seed, and makes the same image.

torch's float32 `randn` of n >= 16 values (CPU, contiguous; aten's `normal_fill`):
1. n uniforms u = (w & 0xFFFFFF) * 2^-24 from the next n 32-bit words w of MT19937, seeded as
   `init_genrand(seed mod 2^32)` (NumPy's legacy `RandomState` seeding is the same);
2. each whole block of 16 becomes 16 normals by Box-Muller over its halves: for j < 8,
   r = sqrt(-2 log(1 - u[j])), theta = 2 pi u[j + 8], out[j] = r cos(theta),
   out[j + 8] = r sin(theta);
3. when 16 does not divide n, 16 more words are drawn and the last 16 values are made again from
   them, as one block.
torch computes step 2 in float32 with its own vectorized log, sin and cos; here it is float64
rounded to float32, so a value may differ from torch's in its last bits (at most 1.3e-6 against
torch 2.13 on SD 1.5's latents; the images agree to float rounding, tests/test_pipeline.py).
Fewer than 16 values go another way in torch (a cached second Box-Muller value per generator),
which no Stable Diffusion latent needs: refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sdport.errors import UsageError

BLOCK = 16  # normal_fill's block: 8 Box-Muller pairs


class TorchCPUNoise:
    """A seeded source of float32 standard normals equal to torch's CPU generator's `randn` draws.

    Args:
        seed: as `torch.Generator("cpu").manual_seed(seed)` takes it, 0 <= seed < 2^64 (torch's
            MT19937 keeps its low 32 bits).

    Sequential, like torch's generator: each `standard_normal` call continues the stream.
    """

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
            raise UsageError(f"torch noise: seed must be an integer in [0, 2^64), got {seed!r}")
        self.seed = int(seed)
        self._words = np.random.MT19937()
        # init_genrand, through public API: legacy RandomState seeding, then its state moved over
        _, key, pos, *_ = np.random.RandomState(self.seed & 0xFFFFFFFF).get_state()
        self._words.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}

    def standard_normal(self, size: tuple[int, ...] | int = (), dtype: Any = np.float32) -> np.ndarray:
        """The next tensor of standard normals, as `torch.randn(size, generator=g)` gives them."""
        shape = (size,) if isinstance(size, (int, np.integer)) else tuple(size)
        count = int(np.prod(shape, dtype=np.int64))
        if count < BLOCK:
            raise UsageError(f"torch noise: a tensor of {count} values (fewer than {BLOCK}) is drawn another way by torch")
        tail = BLOCK if count % BLOCK else 0
        words = self._words.random_raw(count + tail)
        # float32 uniforms, exact: 24 random bits over 2^24
        uniforms = ((words & 0xFFFFFF).astype(np.float64) * 2.0**-24).astype(np.float32)
        values = _box_muller(uniforms[: count - count % BLOCK])
        if tail:
            values = np.concatenate([values[: count - BLOCK], _box_muller(uniforms[count:])])
        return values.reshape(shape).astype(dtype, copy=False)


def _box_muller(uniforms: np.ndarray) -> np.ndarray:
    """float32 uniforms in blocks of 16 -> float32 normals, torch's `normal_fill_16` per block."""
    blocks = uniforms.reshape(-1, BLOCK)
    u1 = (np.float32(1) - blocks[:, : BLOCK // 2]).astype(np.float64)  # (0, 1]: log is finite
    u2 = blocks[:, BLOCK // 2 :].astype(np.float64)
    radius = np.sqrt(-2.0 * np.log(u1))
    theta = 2.0 * np.pi * u2
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1).astype(np.float32).reshape(-1)


class TorchBatchNoise:
    """Noise for a batch of images: row i of every draw from `TorchCPUNoise(seed + i)`, as diffusers
    draws with a list of generators, `[torch.Generator().manual_seed(seed + i) for i in ...]`.

    So image i of a batch is the image of diffusers with `generator=torch.manual_seed(seed + i)`
    alone, and of sdport with seed + i alone (the pipeline's rule for batches).
    """

    def __init__(self, seed: int, count: int) -> None:
        if count < 1 or seed + count - 1 >= 2**64:
            raise UsageError(f"torch noise: seeds {seed}..{seed + count - 1} must lie in [0, 2^64)")
        self.generators = [TorchCPUNoise(seed + i) for i in range(count)]

    def standard_normal(self, size: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """A [count, ...] tensor whose row i is generator i's next draw of shape (1, *size[1:])."""
        size = tuple(size)
        if not size or size[0] != len(self.generators):
            raise UsageError(f"torch noise: shape {size} for a batch of {len(self.generators)} images")
        return np.concatenate([g.standard_normal((1, *size[1:]), dtype) for g in self.generators])
