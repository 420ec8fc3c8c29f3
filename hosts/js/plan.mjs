// The host loop of docs/CONTRACT.md "Sampling plans" (version 1): one loop for every scheduler.
// Arithmetic exactly as sdport/runtime/plans.py's run_plan: per element, float64 products and
// sums in the listed order (samples, outputs, noise), one rounding to float32.

export const PLAN_VERSION = 1;

/** Throws unless `plan` is a runnable (linear) plan of this version. */
export function checkPlan(plan) {
  if (!plan || plan.plan_version !== PLAN_VERSION) {
    throw new Error(`not a version-${PLAN_VERSION} sampling plan (plan_version ${plan && plan.plan_version})`);
  }
  if (!plan.linear) throw new Error(`this plan cannot be run: ${plan.reason || 'it is not linear'}`);
}

/**
 * Runs `plan` from unit-variance `latents` (Float32Array).
 * @param {object} plan a parsed plan JSON
 * @param {(xIn: Float32Array, t: number, i: number) => Promise<Float32Array>} model
 * @param {Float32Array} latents
 * @param {{standardNormal(count: number): Float32Array}|null} rng for stochastic plans
 * @param {(i: number, total: number) => void} [onStep]
 * @returns {Promise<Float32Array>} x_S
 */
export async function runPlan(plan, model, latents, rng, onStep) {
  checkPlan(plan);
  const n = latents.length;
  if (plan.stochastic && !rng) throw new Error(`scheduler ${plan.scheduler} is stochastic: it needs a seeded noise source`);
  const xs = [Float32Array.from(latents, (v) => v * plan.init_noise_sigma)];
  const es = [];
  const total = plan.evaluations.length;
  for (let i = 0; i < total; i++) {
    const ev = plan.evaluations[i];
    const x = xs[xs.length - 1];
    const xIn = new Float32Array(n);
    for (let k = 0; k < n; k++) xIn[k] = x[k] * ev.input_scale;
    const e = await model(xIn, ev.timestep, i);
    if (e.length !== n) throw new Error(`model returned ${e.length} values for ${n} latents`);
    es.push(e);
    const acc = new Float64Array(n);
    for (const [j, a] of ev.samples) {
      const xj = xs[j];
      for (let k = 0; k < n; k++) acc[k] = acc[k] + a * xj[k];
    }
    for (const [j, b] of ev.outputs) {
      const ej = es[j];
      for (let k = 0; k < n; k++) acc[k] = acc[k] + b * ej[k];
    }
    if (ev.noise !== null && ev.noise !== undefined) {
      const z = rng.standardNormal(n);
      for (let k = 0; k < n; k++) acc[k] = acc[k] + ev.noise * z[k];
    }
    xs.push(Float32Array.from(acc));
    if (onStep) onStep(i, total);
  }
  return xs[xs.length - 1];
}
