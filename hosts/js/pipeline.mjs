// Text-to-image from an sdport model folder, for any JavaScript host (Node, browser).
// The steps and their arithmetic are docs/CONTRACT.md's; the host supplies onnxruntime, the
// tokenizer library and file access through `env`, so this file imports nothing.

import { PortableNoise } from './noise.mjs';
import { runPlan, checkPlan } from './plan.mjs';
import { clipTokenizer } from './tokenize.mjs';
import { toRgb } from './image.mjs';

// diffusers scheduler classes -> sdport names (sdport.runtime.schedulers.name_for_config).
const CLASS_NAMES = {
  DDIMScheduler: 'ddim',
  DDPMScheduler: 'ddpm',
  PNDMScheduler: 'pndm',
  LMSDiscreteScheduler: 'lms',
  EulerDiscreteScheduler: 'euler',
  EulerAncestralDiscreteScheduler: 'euler_ancestral',
  HeunDiscreteScheduler: 'heun',
  UniPCMultistepScheduler: 'unipc',
  LCMScheduler: 'lcm',
};

/** The sdport scheduler name of a diffusers scheduler config, or null. */
export function schedulerForConfig(config) {
  if (config._class_name === 'DPMSolverMultistepScheduler') {
    const algorithm = config.algorithm_type || 'dpmsolver++';
    return { 'dpmsolver++': 'dpmpp_2m', 'sde-dpmsolver++': 'dpmpp_2m_sde' }[algorithm] || null;
  }
  return CLASS_NAMES[config._class_name] || null;
}

/** The folder's manifest (sdport.json), checked for what a host needs. */
export async function readManifest(env) {
  const manifest = await env.readJson('sdport.json');
  for (const name of ['text_encoder', 'unet', 'vae_decoder']) {
    if (!manifest.graphs || !manifest.graphs[name]) {
      throw new Error(`sdport.json has no ${name} graph; re-export the model with \`sdport export\``);
    }
  }
  return manifest;
}

/** The folder's CLIP tokenizer (tokenize.mjs) through env.readJson. */
export async function loadTokenizer(env, manifest) {
  const dir = manifest.tokenizer_dir || 'tokenizer';
  const json = await env.readJson(`${dir}/tokenizer.json`);
  const configs = {
    ...((await env.readJson(`${dir}/tokenizer_config.json`, { optional: true })) || {}),
    ...((await env.readJson(`${dir}/special_tokens_map.json`, { optional: true })) || {}),
  };
  for (const key of Object.keys(configs)) if (configs[key] === null) delete configs[key];
  return clipTokenizer(env.Tokenizer, json, configs, manifest.max_tokens);
}

function timestepTensor(ort, spec, t) {
  const shape = spec ? spec.shape : [];
  const dims = shape.length === 0 ? [] : [1];
  if (spec && (spec.dtype === 'int64' || spec.dtype === 'int32')) {
    if (t !== Math.round(t)) {
      throw new Error(`this UNet takes integer timesteps but the plan has ${t}; choose a scheduler with integer timesteps`);
    }
    return spec.dtype === 'int64'
      ? new ort.Tensor('int64', BigInt64Array.of(BigInt(t)), dims)
      : new ort.Tensor('int32', Int32Array.of(t), dims);
  }
  return new ort.Tensor('float32', Float32Array.of(t), dims);
}

function checkFinite(values, what) {
  for (let i = 0; i < values.length; i++) {
    if (!Number.isFinite(values[i])) throw new Error(`${what} has NaN or inf`);
  }
}

/**
 * Generates one image.
 * @param {object} env {ort, Tokenizer, readJson(rel, {optional}), createSession(rel, graphSpec), say(msg),
 *   splitGuidance (optional: with guidance, two batch-1 UNet calls instead of one batch-2 call)}
 * @param {object} request {prompt, negative, steps, guidance, width, height, seed, plan}
 * @returns {Promise<{rgb: Uint8Array, width: number, height: number, latents: Float32Array, seconds: object}>}
 */
export async function generate(env, request) {
  const { ort } = env;
  const say = env.say || (() => {});
  const manifest = request.manifest || (await readManifest(env));
  const { prompt, negative = '', guidance = 7.5, seed = 0, plan } = request;
  checkPlan(plan);
  const multiple = manifest.vae_scale * manifest.latent_multiple;
  const size = (manifest.sample_size || 64) * manifest.vae_scale;
  const width = request.width || size;
  const height = request.height || size;
  for (const [label, v] of [['width', width], ['height', height]]) {
    if (!Number.isInteger(v) || v < multiple || v % multiple) {
      throw new Error(`${label} must be a positive multiple of ${multiple} pixels, got ${v}`);
    }
  }
  if (plan.config && plan.config.prediction_type && plan.config.prediction_type !== manifest.prediction_type) {
    throw new Error(
      `the plan was made for prediction_type ${plan.config.prediction_type}, this model predicts ` +
        `${manifest.prediction_type}: make the plan from this folder with \`sdport plan\``,
    );
  }
  const seconds = {};
  let t0 = performance.now();
  const lap = (name) => {
    const now = performance.now();
    seconds[name] = (now - t0) / 1000;
    t0 = now;
  };

  // 1. text embeddings: [negative, prompt] with guidance > 1 (diffusers' order), else [prompt]
  const guided = guidance > 1;
  const tokenizer = await loadTokenizer(env, manifest);
  const texts = guided ? [negative, prompt] : [prompt];
  const T = manifest.max_tokens;
  const ids = new BigInt64Array(texts.length * T);
  texts.forEach((text, i) => ids.set(tokenizer.encode(text), i * T));
  say('text encoder: loading');
  let session = await env.createSession('text_encoder', manifest.graphs.text_encoder);
  const hidden = (await session.run({ input_ids: new ort.Tensor('int64', ids, [texts.length, T]) })).last_hidden_state;
  await session.release();
  checkFinite(hidden.data, 'text_encoder output');
  lap('text_encoder');

  // 2. initial latents: draw 0 of PortableNoise(seed)
  const c = manifest.latent_channels;
  const h = height / manifest.vae_scale;
  const w = width / manifest.vae_scale;
  const n = c * h * w;
  const noise = new PortableNoise(seed);
  const latents = noise.standardNormal(n);

  // 3. the plan's loop; classifier-free guidance in float32, as the Python pipeline
  say('unet: loading');
  session = await env.createSession('unet', manifest.graphs.unet);
  const timestepSpec = (manifest.graphs.unet.inputs || []).find((p) => p.name === 'timestep');
  const f = Math.fround;
  const g = f(guidance);
  const unet = async (sample, batch, states, t) => (await session.run({
    sample: new ort.Tensor('float32', sample, [batch, c, h, w]),
    timestep: timestepTensor(ort, timestepSpec, t),
    encoder_hidden_states: states,
  })).out_sample.data;
  // env.splitGuidance: the [negative, prompt] halves as two batch-1 calls, which halves the UNet's
  // activation memory (32-bit WASM: an SD 1.5-sized UNet at 512 px hit std::bad_alloc with batch
  // 2). Off by default: with several intra-op threads batch 1 and batch 2 can round differently
  // in the last bit (tiny model, 2 threads: 1.5e-6), and the Node host matches Python bit for bit.
  const split = guided && Boolean(env.splitGuidance);
  const D = hidden.dims[2];
  const halves = split ? [0, 1].map((b) => new ort.Tensor('float32', hidden.data.slice(b * T * D, (b + 1) * T * D), [1, T, D])) : null;
  const model = async (xIn, t, i) => {
    let out;
    if (split) {
      out = new Float32Array(2 * n);
      out.set(await unet(xIn, 1, halves[0], t), 0);
      out.set(await unet(xIn, 1, halves[1], t), n);
    } else {
      const batch = guided ? 2 : 1;
      const sample = new Float32Array(batch * n);
      sample.set(xIn, 0);
      if (guided) sample.set(xIn, n);
      out = await unet(sample, batch, hidden, t);
    }
    checkFinite(out, `unet output at evaluation ${i + 1} (timestep ${t})`);
    if (!guided) return Float32Array.from(out);
    const e = new Float32Array(n);
    for (let k = 0; k < n; k++) {
      const u = out[k];
      e[k] = f(u + f(g * f(out[n + k] - u)));
    }
    return e;
  };
  const total = plan.evaluations.length;
  say(`step 0/${total}`);
  const x = await runPlan(plan, model, latents, noise, (i) => say(`step ${i + 1}/${total}`));
  await session.release();
  checkFinite(x, 'latents');
  lap('unet');

  // 4. VAE decode of latents / scaling_factor (float32), then 8-bit RGB
  say('vae decoder: loading');
  const scale = f(manifest.vae_scaling_factor);
  const scaled = Float32Array.from(x, (v) => v / scale);
  session = await env.createSession('vae_decoder', manifest.graphs.vae_decoder);
  const pixels = (await session.run({ latent_sample: new ort.Tensor('float32', scaled, [1, c, h, w]) })).sample;
  await session.release();
  checkFinite(pixels.data, 'vae_decoder output');
  lap('vae_decoder');
  say('done');
  return { rgb: toRgb(pixels.data, width, height), width, height, latents: x, seconds };
}
