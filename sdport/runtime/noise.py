"""Portable seeded noise: the same seed gives the same float32 normals in every host language.

    rng = PortableNoise(seed)              # image 0's noise
    latents = rng.standard_normal((1, 4, 64, 64), dtype=np.float32)   # draw 0
    x = denoise("euler_ancestral", config, model, latents, 25, rng=rng)  # draws 1, 2, ...

The generator is specified in docs/CONTRACT.md ("Portable noise") so that a host written in
JavaScript, Rust, C# or Java reproduces it bit for bit:

1. Bits: Philox4x32-10 (Salmon et al. 2011, Random123's reference), key = the 64-bit seed as
   (low word, high word), counter = (block, draw, stream, 0). `draw` counts the tensors drawn
   from one generator (0, 1, 2, ...), `block` the 4-word outputs within one tensor.
2. Normals: Marsaglia's polar method on each pair of words, in float64 using only + - * / and
   sqrt (which IEEE 754 rounds correctly everywhere) and `portable_log`, a fixed polynomial
   (fdlibm's e_log.c) instead of the platform's log, whose last bit differs between libms.
   Rejected pairs are skipped; accepted pairs give two normals; each is rounded to float32.

NumPy only; numpy's float64 ufuncs are single IEEE operations (no fused multiply-add), which
is what makes the float64 steps reproducible.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import numpy as np

from sdport.errors import UsageError

SPEC_VERSION = 1  # docs/CONTRACT.md "Portable noise", version 1

# Philox4x32 constants (Random123 philox.h).
PHILOX_M0, PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = np.uint64(0xFFFFFFFF)

# fdlibm e_log.c constants, written so both languages parse them to the same doubles
# (each is the shortest repr of the hex pattern in the comment).
LN2_HI = 0.6931471803691238  # 0x3fe62e42fee00000
LN2_LO = 1.9082149292705877e-10  # 0x3dea39ef35793c76
LG1 = 0.6666666666666735  # 0x3fe5555555555593
LG2 = 0.3999999999940942  # 0x3fd999999997fa04
LG3 = 0.2857142874366239  # 0x3fd2492494229359
LG4 = 0.22222198432149784  # 0x3fcc71c51d8e78af
LG5 = 0.1818357216161805  # 0x3fc7466496cb03de
LG6 = 0.15313837699209373  # 0x3fc39a09d078c69f
LG7 = 0.14798198605116586  # 0x3fc2f112df3e5244
SQRT2 = 1.4142135623730951  # 0x3ff6a09e667f3bcd

TWO_POW_M31 = 2.0**-31


def philox4x32(counter: np.ndarray, key: tuple[int, int], rounds: int = PHILOX_ROUNDS) -> np.ndarray:
    """Philox4x32-R of counters [n, 4] (uint32) under key (k0, k1) -> uint32 words [n, 4].

    Each round: (hi0, lo0) = M0 * c0, (hi1, lo1) = M1 * c2 (64-bit products split in words),
    c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); the key gains (W0, W1) mod 2^32 between rounds.
    """
    c = np.asarray(counter, dtype=np.uint32).astype(np.uint64)
    c0, c1, c2, c3 = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & 0xFFFFFFFF, (k1 + PHILOX_W1) & 0xFFFFFFFF
        p0, p1 = PHILOX_M0 * c0, PHILOX_M1 * c2  # exact: both factors < 2^32
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0),
            p1 & MASK32,
            (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1),
            p0 & MASK32,
        )
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def portable_log(s: np.ndarray) -> np.ndarray:
    """Natural log of positive normal float64 values, the same bits on every IEEE 754 host.

    fdlibm's e_log.c: s = m 2^k with m in [sqrt(2)/2, sqrt(2)), f = m - 1, then a degree-14
    polynomial in f / (2 + f). Error under 1 ulp; only + - * / on doubles, in this order.
    """
    s = np.asarray(s, dtype=np.float64)
    m, k = np.frexp(s)  # s = m 2^k, m in [0.5, 1): exact
    m, k = m * 2.0, k - 1  # m in [1, 2)
    high = m >= SQRT2
    m = np.where(high, m * 0.5, m)  # m in [sqrt(2)/2, sqrt(2)): exact
    k = np.where(high, k + 1, k).astype(np.float64)
    f = m - 1.0  # exact (Sterbenz)
    r = f / (2.0 + f)
    z = r * r
    w = z * z
    t1 = w * (LG2 + w * (LG4 + w * LG6))
    t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)))
    R = t2 + t1
    hfsq = 0.5 * f * f
    return k * LN2_HI - ((hfsq - (r * (hfsq + R) + k * LN2_LO)) - f)


def polar_pairs(words: np.ndarray) -> np.ndarray:
    """uint32 words [n, 2] -> float64 normals [m, 2] of the accepted pairs, in order.

    u = (a + 1/2) 2^-31 - 1 and v likewise (exact, in (-1, 1)); s = u u + v v; a pair is kept
    when s < 1; then f = sqrt(-2 log(s) / s) and the normals are (u f, v f).
    """
    uv = (words.astype(np.float64) + 0.5) * TWO_POW_M31 - 1.0
    u, v = uv[:, 0], uv[:, 1]
    s = u * u + v * v
    keep = s < 1.0  # s > 0 always: u is never 0
    u, v, s = u[keep], v[keep], s[keep]
    f = np.sqrt((-2.0 * portable_log(s)) / s)
    return np.stack([u * f, v * f], axis=1)


def normals(seed: int, stream: int, draw: int, count: int) -> np.ndarray:
    """The first `count` float32 normals of tensor `draw` of (seed, stream), as a flat array."""
    key = (seed & 0xFFFFFFFF, seed >> 32)
    out: list[np.ndarray] = []
    have, block = 0, 0
    while have < count:
        # Pairs are accepted with probability pi/4; ask for ~10% more blocks than expected.
        need = (count - have + 1) // 2
        blocks = int(need / (2 * np.pi / 4) * 1.1) + 4
        if block + blocks > 2**32:
            raise UsageError(f"portable noise: a tensor of {count} elements is too large (at most ~2^33)")
        counter = np.zeros((blocks, 4), dtype=np.uint32)
        counter[:, 0] = np.arange(block, block + blocks, dtype=np.uint64)
        counter[:, 1] = draw
        counter[:, 2] = stream
        words = philox4x32(counter, key).reshape(-1, 2)  # (w0, w1), (w2, w3) per block
        pairs = polar_pairs(words).reshape(-1)
        out.append(pairs)
        have += len(pairs)
        block += blocks
    return np.concatenate(out)[:count].astype(np.float32)  # round to nearest even, as IEEE


class PortableNoise:
    """A seeded source of float32 standard normals that every sdport host reproduces exactly.

    Args:
        seed: 0 <= seed < 2^64, the Philox key.
        stream: 0 <= stream < 2^32, an independent sequence under the same seed (counter word 2).

    Each `standard_normal` call draws the next tensor (draw 0, 1, 2, ...); its elements fill the
    shape in C order. It has the one method the schedulers and the pipeline call, so it can be
    passed as `rng` wherever an `np.random.Generator` is taken.
    """

    def __init__(self, seed: int, stream: int = 0) -> None:
        for label, value, bits in (("seed", seed, 64), ("stream", stream, 32)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**bits:
                raise UsageError(f"portable noise: {label} must be an integer in [0, 2^{bits}), got {value!r}")
        self.seed = int(seed)
        self.stream = int(stream)
        self.draws = 0  # tensors drawn so far: the next draw's index

    def standard_normal(self, size: tuple[int, ...] | int = (), dtype: Any = np.float32) -> np.ndarray:
        """The next tensor of standard normals, float32 (float64 `dtype` gives the same values widened)."""
        values = self.tensor(self.draws, size, dtype)
        self.draws += 1
        return values

    def tensor(self, draw: int, size: tuple[int, ...] | int = (), dtype: Any = np.float32) -> np.ndarray:
        """Tensor `draw` of this generator, as that draw's `standard_normal` call returns it; draws nothing."""
        shape = (size,) if isinstance(size, (int, np.integer)) else tuple(size)
        count = int(np.prod(shape, dtype=np.int64))
        return normals(self.seed, self.stream, draw, count).reshape(shape).astype(dtype, copy=False)


class BatchNoise:
    """Noise for a batch of images: row i of every draw comes from `PortableNoise(seed + i)`.

    So image i of a batch is the image a single-image run with seed + i gives, in every host
    (the pipeline's existing rule for batches).
    """

    def __init__(self, seed: int, count: int) -> None:
        if count < 1 or seed + count - 1 >= 2**64:
            raise UsageError(f"portable noise: seeds {seed}..{seed + count - 1} must lie in [0, 2^64)")
        self.generators = [PortableNoise(seed + i) for i in range(count)]

    @property
    def draws(self) -> int:
        """Tensors drawn so far (every generator has drawn as many)."""
        return self.generators[0].draws

    def standard_normal(self, size: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """A [count, ...] tensor whose row i is generator i's next draw of shape size[1:]."""
        values = self.tensor(self.draws, size, dtype)
        self.skip()
        return values

    def tensor(self, draw: int, size: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """Tensor `draw` of the batch, as that draw's `standard_normal` call returns it; draws nothing."""
        size = tuple(size)
        if not size or size[0] != len(self.generators):
            raise UsageError(f"portable noise: shape {size} for a batch of {len(self.generators)} images")
        return np.stack([g.tensor(draw, size[1:], dtype) for g in self.generators])

    def skip(self) -> None:
        """Moves every generator past its next draw."""
        for generator in self.generators:
            generator.draws += 1


class LookaheadNoise:
    """A BatchNoise whose next tensor is drawn in a background thread, while the caller runs the UNet.

    The stochastic samplers draw one tensor of the latents' shape after each UNet run, on the
    host: 0.6 ms at SD 1.5 latents (torch's generator takes 0.04 ms), 4% of an SD 1.5 step on a
    GPU. onnxruntime releases the GIL while it runs, so the draw that will follow the next run is
    made during it. Each call returns exactly what `source.standard_normal` would (a guess that
    missed, a different shape or dtype, is drawn again in the caller's thread), and moves `source`
    on by one draw, so the two can be mixed. Use it as a context manager, or `close` it: its
    thread (started at the first draw) ends then, leaving an unused guess to finish on its own.
    """

    def __init__(self, source: BatchNoise) -> None:
        self.source = source
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdport-noise")
        self._ahead: tuple[tuple, concurrent.futures.Future] | None = None

    def standard_normal(self, size: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        request = (self.source.draws, tuple(size), np.dtype(dtype))
        ahead, self._ahead = self._ahead, None
        values = ahead[1].result() if ahead is not None and ahead[0] == request else self.source.tensor(*request)
        self.source.skip()
        following = (request[0] + 1, *request[1:])
        self._ahead = (following, self._pool.submit(self.source.tensor, *following))
        return values

    def close(self) -> None:
        self._ahead = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> LookaheadNoise:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
