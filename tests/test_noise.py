"""Portable noise: the spec's test vectors, a scalar re-implementation of the spec, streams.

The vectors here are the ones docs/CONTRACT.md lists; hosts in other languages test against
the same numbers (tests/test_hosts.py runs the JavaScript implementation on them).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdport.errors import UsageError
from sdport.runtime.noise import (
    LG1, LG2, LG3, LG4, LG5, LG6, LG7, LN2_HI, LN2_LO, SQRT2,
    BatchNoise,
    LookaheadNoise,
    PortableNoise,
    philox4x32,
    portable_log,
)
from sdport.runtime.schedulers import denoise

# Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter, key -> output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

# docs/CONTRACT.md test vectors: the first 8 float32 normals of draw 0, as IEEE bit patterns.
VECTORS = {
    (0, 0): "be806375 3f71f702 3fbdf04c 3f29fee8 3e7a3433 bd922267 bf2d9a97 bedcb8ff",
    (0, 1): "3cde1ec1 3f36f834 bf34d891 3ccb8666 3ec72d29 3ef0105b be73390a c030f114",
    (42, 0): "4014839b bf25341f bf1282db be5a8804 3f647d56 c03ba87f 3f82b278 3efdfc5e",
    (42, 1): "bf782b7d 3f4400d6 bea82b88 be69f374 be8f1a1e bebbee74 bf39e84b bff80eb1",
}
SEED0_DRAW1 = "be242f39 3f4da614 bd40c842 beeb6385"  # seed 0, stream 0: first 4 of the second draw


def bits(values: np.ndarray) -> str:
    return " ".join(f"{b:08x}" for b in np.asarray(values, dtype=np.float32).view(np.uint32))


def test_philox_known_answers():
    for counter, key, expected in PHILOX_KAT:
        out = philox4x32(np.array([counter], dtype=np.uint32), key)
        assert tuple(int(w) for w in out[0]) == expected


@pytest.mark.parametrize("seed, stream", list(VECTORS))
def test_vectors(seed, stream):
    assert bits(PortableNoise(seed, stream).standard_normal(8)) == VECTORS[seed, stream]


def test_draws_advance():
    rng = PortableNoise(0)
    first = rng.standard_normal((2, 4))
    assert bits(first.ravel()) == VECTORS[0, 0]
    assert bits(rng.standard_normal(4)) == SEED0_DRAW1
    assert rng.draws == 2


def test_prefix_property():
    """A tensor's elements do not depend on its shape or size: a smaller draw is a prefix."""
    big = PortableNoise(5).standard_normal((3, 4, 16, 16)).ravel()
    small = PortableNoise(5).standard_normal((1, 4, 8, 8)).ravel()
    np.testing.assert_array_equal(small, big[: small.size])


def test_constants_are_fdlibms():
    """The decimal literals parse to fdlibm's bit patterns (what every host must use)."""
    expected = {
        LN2_HI: "3fe62e42fee00000", LN2_LO: "3dea39ef35793c76", LG1: "3fe5555555555593",
        LG2: "3fd999999997fa04", LG3: "3fd2492494229359", LG4: "3fcc71c51d8e78af",
        LG5: "3fc7466496cb03de", LG6: "3fc39a09d078c69f", LG7: "3fc2f112df3e5244",
        SQRT2: "3ff6a09e667f3bcd",
    }
    for value, pattern in expected.items():
        assert np.float64(value).view(np.uint64) == int(pattern, 16)


def test_portable_log_is_accurate():
    """Within 1 ulp of the platform's log (which is itself not the same on every host)."""
    s = np.random.default_rng(0).random(200_000) ** 4 + 2.0**-64
    ours, ref = portable_log(s), np.log(s)
    assert np.max(np.abs(ours - ref) / np.spacing(np.abs(ref))) <= 1.0
    assert portable_log(np.array([1.0, 0.5, 0.25]))[0] == 0.0


def _log_scalar(s: float) -> float:
    """The spec's log, one Python float at a time (an independent transcription)."""
    m, k = math.frexp(s)
    m, k = m * 2.0, k - 1
    if m >= SQRT2:
        m, k = m * 0.5, k + 1
    f = m - 1.0
    r = f / (2.0 + f)
    z = r * r
    w = z * z
    t1 = w * (LG2 + w * (LG4 + w * LG6))
    t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)))
    R = t2 + t1
    hfsq = 0.5 * f * f
    return k * LN2_HI - ((hfsq - (r * (hfsq + R) + k * LN2_LO)) - f)


def _normals_scalar(seed: int, stream: int, draw: int, count: int) -> list[float]:
    """The spec, literally: blocks in order, pairs in order, reject s >= 1, round to float32."""
    out: list[float] = []
    block = 0
    while len(out) < count:
        words = philox4x32(np.array([[block, draw, stream, 0]], dtype=np.uint32), (seed & 0xFFFFFFFF, seed >> 32))[0]
        for a, b in ((int(words[0]), int(words[1])), (int(words[2]), int(words[3]))):
            u = (a + 0.5) * 2.0**-31 - 1.0
            v = (b + 0.5) * 2.0**-31 - 1.0
            s = u * u + v * v
            if s < 1.0:
                f = math.sqrt((-2.0 * _log_scalar(s)) / s)
                out += [u * f, v * f]
        block += 1
    return out[:count]


@pytest.mark.parametrize("seed, stream, draw", [(0, 0, 0), (42, 1, 3), (2**64 - 1, 2**32 - 1, 7), (123456789012, 5, 0)])
def test_matches_scalar_transcription(seed, stream, draw):
    rng = PortableNoise(seed, stream)
    for _ in range(draw):
        rng.standard_normal(1)
    ours = rng.standard_normal(301)
    ref = np.array(_normals_scalar(seed, stream, draw, 301), dtype=np.float32)
    assert bits(ours) == bits(ref)


def test_distribution():
    """Standard normal to the precision 10^6 samples can tell."""
    x = PortableNoise(1).standard_normal(1_000_000).astype(np.float64)
    assert abs(x.mean()) < 0.005 and abs(x.std() - 1) < 0.005
    assert abs((x**3).mean()) < 0.02 and abs((x**4).mean() - 3) < 0.05
    # the tails reach where 32-bit uniforms allow (|x| up to ~9.4)
    assert 4.0 < np.abs(x).max() < 9.5


def test_streams_and_seeds_independent():
    a = PortableNoise(3, 0).standard_normal(10_000)
    b = PortableNoise(3, 1).standard_normal(10_000)
    c = PortableNoise(4, 0).standard_normal(10_000)
    for x, y in ((a, b), (a, c), (b, c)):
        assert abs(np.corrcoef(x, y)[0, 1]) < 0.05


def test_batch_rows_are_single_images():
    """Image i of a batch is the single-image run with seed + i, for every draw."""
    batch = BatchNoise(10, 3)
    singles = [PortableNoise(10 + i) for i in range(3)]
    for shape in ((3, 4, 8, 8), (3, 4, 8, 8), (3, 2)):
        rows = batch.standard_normal(shape)
        for i, single in enumerate(singles):
            np.testing.assert_array_equal(rows[i], single.standard_normal(shape[1:]))
    with pytest.raises(UsageError, match="batch"):
        batch.standard_normal((2, 4))


def test_dtype_and_scalars():
    x = PortableNoise(0).standard_normal((2, 3), dtype=np.float64)
    assert x.dtype == np.float64 and x.shape == (2, 3)
    assert bits(x.ravel()[:6]) == " ".join(VECTORS[0, 0].split()[:6])
    assert PortableNoise(0).standard_normal(()).shape == ()


def test_bad_arguments():
    for seed in (-1, 2**64, 1.5, True):
        with pytest.raises(UsageError, match="seed"):
            PortableNoise(seed)
    with pytest.raises(UsageError, match="stream"):
        PortableNoise(0, stream=2**32)


def model(x, t):
    """A stand-in UNet for the scheduler loops below."""
    return np.tanh(x) * 0.5


def test_as_scheduler_rng():
    """It is a drop-in `rng` for the stochastic schedulers."""
    latents = PortableNoise(9).standard_normal((1, 4, 8, 8))
    a = denoise("euler_ancestral", {}, model, latents, 5, rng=PortableNoise(9))
    b = denoise("euler_ancestral", {}, model, latents, 5, rng=PortableNoise(9))
    c = denoise("euler_ancestral", {}, model, latents, 5, rng=PortableNoise(10))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_lookahead_draws_what_the_batch_draws():
    """Each call returns the batch's next draw, whether the guess made in the background was
    right (same shape and dtype) or not, and leaves the batch at the same draw."""
    requests = [((2, 4, 8, 8), np.float32)] * 3 + [((2, 3), np.float32), ((2, 3), np.float64), ((2, 4, 8, 8), np.float32)]
    reference = BatchNoise(7, 2)
    source = BatchNoise(7, 2)
    with LookaheadNoise(source) as ahead:
        for k, (shape, dtype) in enumerate(requests):
            # a draw on the batch itself in between: the lookahead's guess for it goes unused
            plain = k == 4
            got = (source if plain else ahead).standard_normal(shape, dtype=dtype)
            want = reference.standard_normal(shape, dtype=dtype)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
            assert source.draws == reference.draws == k + 1
        with pytest.raises(UsageError, match="batch"):
            ahead.standard_normal((3, 4))


def test_lookahead_as_scheduler_rng():
    latents = PortableNoise(9).standard_normal((1, 4, 8, 8))
    for name in ("euler_ancestral", "dpmpp_2m_sde", "ddpm", "lcm"):
        with LookaheadNoise(BatchNoise(9, 1)) as ahead:
            a = denoise(name, {}, model, latents, 6, rng=ahead)
        np.testing.assert_array_equal(a, denoise(name, {}, model, latents, 6, rng=BatchNoise(9, 1)))
