// Portable noise, docs/CONTRACT.md "Portable noise" (version 1): Philox4x32-10 words, Marsaglia's
// polar method in float64 with fdlibm's log, rounded to float32. The same bits as
// sdport/runtime/noise.py on every engine: only uint32 integer math (Math.imul, 16-bit halves)
// and IEEE + - * / sqrt on doubles, which JavaScript never fuses or reorders.

const M0 = 0xd2511f53;
const M1 = 0xcd9e8d57;
const W0 = 0x9e3779b9;
const W1 = 0xbb67ae85;

// fdlibm e_log.c constants (decimal literals that parse to the hex patterns in noise.py).
const LN2_HI = 0.6931471803691238;
const LN2_LO = 1.9082149292705877e-10;
const LG1 = 0.6666666666666735;
const LG2 = 0.3999999999940942;
const LG3 = 0.2857142874366239;
const LG4 = 0.22222198432149784;
const LG5 = 0.1818357216161805;
const LG6 = 0.15313837699209373;
const LG7 = 0.14798198605116586;
const SQRT2 = 1.4142135623730951;
const TWO_POW_M31 = 2 ** -31;

/** High 32 bits of the 64-bit product of two uint32 (every partial product < 2^53: exact). */
function mulhi(a, b) {
  const aLo = a & 0xffff, aHi = a >>> 16, bLo = b & 0xffff, bHi = b >>> 16;
  const loHi = aLo * bHi, hiLo = aHi * bLo;
  const cross = ((aLo * bLo) >>> 16) + (loHi & 0xffff) + (hiLo & 0xffff);
  return (aHi * bHi + (loHi >>> 16) + (hiLo >>> 16) + Math.floor(cross / 65536)) >>> 0;
}

/** Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1): writes 4 uint32 into out. */
export function philox4x32(c0, c1, c2, c3, k0, k1, out) {
  for (let r = 0; r < 10; r++) {
    if (r) {
      k0 = (k0 + W0) >>> 0;
      k1 = (k1 + W1) >>> 0;
    }
    const hi0 = mulhi(M0, c0), lo0 = Math.imul(M0, c0) >>> 0;
    const hi1 = mulhi(M1, c2), lo1 = Math.imul(M1, c2) >>> 0;
    c0 = (hi1 ^ c1 ^ k0) >>> 0;
    c1 = lo1;
    c2 = (hi0 ^ c3 ^ k1) >>> 0;
    c3 = lo0;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
  return out;
}

const view = new DataView(new ArrayBuffer(8));

/** fdlibm's log for positive normal doubles: the same bits as noise.portable_log. */
export function portableLog(s) {
  // s = m 2^k with m in [1, 2), read off the IEEE bits (exact)
  view.setFloat64(0, s, true);
  const hi = view.getUint32(4, true);
  let k = ((hi >>> 20) & 0x7ff) - 1023;
  view.setUint32(4, (hi & 0x800fffff) | 0x3ff00000, true);
  let m = view.getFloat64(0, true);
  if (m >= SQRT2) {
    m = m * 0.5;
    k = k + 1;
  }
  const f = m - 1.0;
  const r = f / (2.0 + f);
  const z = r * r;
  const w = z * z;
  const t1 = w * (LG2 + w * (LG4 + w * LG6));
  const t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)));
  const R = t2 + t1;
  const hfsq = 0.5 * f * f;
  return k * LN2_HI - ((hfsq - (r * (hfsq + R) + k * LN2_LO)) - f);
}

/** float32 normals of tensor `draw` of (seed, stream): `count` of them, in order. */
export function normals(seedLo, seedHi, stream, draw, count) {
  const out = new Float32Array(count);
  const words = new Uint32Array(4);
  let have = 0;
  for (let block = 0; have < count; block++) {
    if (block > 0xffffffff) throw new Error(`portable noise: a tensor of ${count} elements is too large`);
    philox4x32(block >>> 0, draw >>> 0, stream >>> 0, 0, seedLo, seedHi, words);
    for (let p = 0; p < 4 && have < count; p += 2) {
      const u = (words[p] + 0.5) * TWO_POW_M31 - 1.0;
      const v = (words[p + 1] + 0.5) * TWO_POW_M31 - 1.0;
      const s = u * u + v * v;
      if (!(s < 1.0)) continue; // rejected pair
      const f = Math.sqrt((-2.0 * portableLog(s)) / s);
      out[have++] = u * f; // Float32Array stores round to nearest even
      if (have < count) out[have++] = v * f;
    }
  }
  return out;
}

/** A seeded source of float32 standard normals; each call draws the next tensor. */
export class PortableNoise {
  /**
   * @param {bigint|number|string} seed 0 <= seed < 2^64
   * @param {number} stream 0 <= stream < 2^32
   */
  constructor(seed, stream = 0) {
    let s;
    try {
      s = BigInt(seed);
    } catch {
      throw new Error(`seed must be an integer in [0, 2^64), got ${seed}`);
    }
    if (s < 0n || s >= 1n << 64n) throw new Error(`seed must be an integer in [0, 2^64), got ${seed}`);
    if (!Number.isInteger(stream) || stream < 0 || stream >= 2 ** 32) {
      throw new Error(`stream must be an integer in [0, 2^32), got ${stream}`);
    }
    this.seedLo = Number(s & 0xffffffffn);
    this.seedHi = Number(s >> 32n);
    this.stream = stream;
    this.draws = 0;
  }

  /** The next tensor: `count` float32 normals (fill a shape in C order). */
  standardNormal(count) {
    const out = normals(this.seedLo, this.seedHi, this.stream, this.draws, count);
    this.draws += 1;
    return out;
  }
}
