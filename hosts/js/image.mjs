// VAE output -> 8-bit RGB, as sdport/runtime/images.py (diffusers' numpy_to_pil), in float32:
// v = clip(x / 2 + 0.5, 0, 1); byte = round_half_even(v * 255).

/** float32 [1, 3, H, W] (channel planes) -> Uint8Array [H, W, 3] (interleaved RGB). */
export function toRgb(decoded, width, height) {
  const f = Math.fround;
  const plane = width * height;
  if (decoded.length !== 3 * plane) throw new Error(`VAE output has ${decoded.length} values for ${width}x${height} RGB`);
  const rgb = new Uint8Array(3 * plane);
  for (let c = 0; c < 3; c++) {
    for (let p = 0; p < plane; p++) {
      let v = f(f(decoded[c * plane + p] / 2) + 0.5);
      v = v < 0 ? 0 : v > 1 ? 1 : v; // NaN cannot reach here: the pipeline checks
      const scaled = f(v * 255);
      let r = Math.round(scaled); // half up; NumPy rounds half to even
      if (r - scaled === 0.5 && r % 2 === 1) r -= 1;
      rgb[3 * p + c] = r;
    }
  }
  return rgb;
}
