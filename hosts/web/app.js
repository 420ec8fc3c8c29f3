// sdport's browser host: the shared pipeline (hosts/js/) on onnxruntime-web's WASM backend.
// URL parameters prefill the form (prompt, negative, scheduler, steps, guidance, width, height,
// seed, plan = a plan URL); auto=1 starts at once. The outcome is left in `window.sdport`
// ({state: "done" | "error", result | error}) for scripts such as headless.mjs.

import * as ort from '/node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';
import { Tokenizer } from '/node_modules/@huggingface/tokenizers/dist/tokenizers.mjs';
import { generate, loadTokenizer, readManifest } from '../js/pipeline.mjs';

ort.env.wasm.wasmPaths = '/node_modules/onnxruntime-web/dist/'; // root-relative, trailing slash
if (!self.crossOriginIsolated) ort.env.wasm.numThreads = 1; // threads need COOP/COEP (serve.mjs sends them)

const MODEL = '/model/';
const $ = (id) => document.getElementById(id);
const progress = (line) => { $('progress').textContent = line; };
window.sdport = { state: 'idle', log: [] };

async function fetchJson(url, optional = false) {
  const res = await fetch(url);
  if (res.status === 404 && optional) return undefined;
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  return res.json();
}

const env = {
  ort,
  Tokenizer,
  // One batch-1 UNet call per guidance half: 32-bit WASM has 4 GB, and an SD 1.5-sized fp16 UNet
  // at 512 px ran out of it with batch 2 (pipeline.mjs).
  splitGuidance: true,
  readJson: (rel, { optional = false } = {}) => fetchJson(MODEL + rel, optional),
  async createSession(name, spec) {
    const options = { executionProviders: ['wasm'], graphOptimizationLevel: 'extended' };
    if (spec.external_data) {
      // the graph names its weights file relative to itself; the manifest, relative to the folder
      options.externalData = [{ path: spec.external_data.split('/').pop(), data: MODEL + spec.external_data }];
    }
    return ort.InferenceSession.create(MODEL + spec.file, options);
  },
  say(line) {
    window.sdport.log.push(line);
    progress(line);
  },
};

function request() {
  const value = (id) => $(id).value.trim();
  const int = (id) => (value(id) === '' ? undefined : Number.parseInt(value(id), 10));
  return {
    prompt: $('prompt').value,
    negative: $('negative').value,
    scheduler: value('scheduler'),
    steps: int('steps'),
    guidance: Number(value('guidance')),
    width: int('width'),
    height: int('height'),
    seed: value('seed') || '0',
  };
}

function show(result) {
  const canvas = $('image');
  canvas.width = result.width;
  canvas.height = result.height;
  const rgba = new Uint8ClampedArray(result.width * result.height * 4);
  for (let p = 0, q = 0; p < result.rgb.length; p += 3, q += 4) {
    rgba[q] = result.rgb[p];
    rgba[q + 1] = result.rgb[p + 1];
    rgba[q + 2] = result.rgb[p + 2];
    rgba[q + 3] = 255;
  }
  canvas.getContext('2d').putImageData(new ImageData(rgba, result.width, result.height), 0, 0);
}

function base64(bytes) {
  let s = '';
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

async function run(planUrl) {
  $('go').disabled = true;
  window.sdport = { state: 'running', log: [] };
  const started = performance.now();
  try {
    const req = request();
    const url = planUrl || `${MODEL}plans/${req.scheduler}-${req.steps}.json`;
    const plan = await fetchJson(url, true);
    if (!plan) {
      throw new Error(`no plan at ${url}: write it with \`sdport plan MODEL_DIR --scheduler ${req.scheduler} --steps ${req.steps}\``);
    }
    const manifest = await readManifest(env);
    const result = await generate(env, { ...req, manifest, plan });
    show(result);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    progress(`done: ${result.width}x${result.height}, ${plan.scheduler}, ${plan.steps} steps, seed ${req.seed} in ${seconds} s ` +
      `(${ort.env.wasm.numThreads || 'auto'} threads${self.crossOriginIsolated ? '' : ', not cross-origin isolated'})`);
    window.sdport = {
      state: 'done',
      log: window.sdport.log,
      result: { width: result.width, height: result.height, rgb: base64(result.rgb), seconds: result.seconds },
    };
  } catch (err) {
    console.error(err);
    progress(`error: ${err.message || err}`);
    window.sdport = { state: 'error', log: window.sdport.log, error: String(err.message || err) };
  } finally {
    $('go').disabled = false;
  }
}

/** Token ids of each prompt, as the pipeline computes them (for tests). */
window.sdportTokenize = async (prompts) => {
  const tokenizer = await loadTokenizer(env, await readManifest(env));
  return prompts.map((p) => Array.from(tokenizer.encode(p), Number));
};

const params = new URLSearchParams(location.search);
for (const id of ['prompt', 'negative', 'scheduler', 'steps', 'guidance', 'width', 'height', 'seed']) {
  if (params.has(id)) $(id).value = params.get(id);
}
$('form').addEventListener('submit', (event) => {
  event.preventDefault();
  run(params.get('plan'));
});
if (params.get('auto') === '1') run(params.get('plan'));
