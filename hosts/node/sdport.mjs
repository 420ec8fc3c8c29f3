#!/usr/bin/env node
// sdport's Node.js host: an sdport model folder + a sampling plan -> a PNG, with onnxruntime-node.
//
//   node hosts/node/sdport.mjs MODEL_DIR "a prompt" --steps 25 --scheduler euler --seed 1 --out x.png
//
// The plan comes from --plan FILE or MODEL_DIR/plans/<scheduler>-<steps>.json, written once by
// `sdport plan MODEL_DIR --scheduler euler --steps 25` (docs/CONTRACT.md says why).

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import * as ort from 'onnxruntime-node';
import { Tokenizer } from '@huggingface/tokenizers';
import { generate, readManifest, schedulerForConfig } from '../js/pipeline.mjs';
import { encodePng } from './png.mjs';

const USAGE = `usage: node hosts/node/sdport.mjs MODEL_DIR PROMPT [--negative TEXT] [--steps 25] [--guidance 7.5]
       [--width W] [--height H] [--seed 0] [--scheduler NAME] [--plan PLAN.json] [--out sdport.png]
       [--threads N] [--raw-latents FILE] [--quiet]`;

function fail(message) {
  console.error(`sdport: error: ${message}`);
  process.exit(2);
}

function number(value, name, integer = true) {
  if (value === undefined) return undefined;
  const v = Number(value);
  if (!Number.isFinite(v) || (integer && !Number.isInteger(v))) fail(`--${name} must be ${integer ? 'an integer' : 'a number'}, got ${value}`);
  return v;
}

function readJsonFile(file, what) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if (err.code === 'ENOENT') return undefined;
    throw err;
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    fail(`${file}: not valid JSON (${err.message})${what ? `; ${what}` : ''}`);
  }
}

/** One thread per physical core, as sdport/runtime/sessions.py: onnxruntime's results can
 * depend on the intra-op thread count in the last bit, so the hosts pick the same one. */
function physicalCores() {
  const logical = os.availableParallelism();
  if (process.platform !== 'linux') return Math.max(1, Math.floor(logical / 2));
  const cores = new Set();
  try {
    for (const cpu of os.cpus().keys()) {
      const topology = `/sys/devices/system/cpu/cpu${cpu}/topology`;
      const read = (f) => fs.readFileSync(`${topology}/${f}`, 'utf8').trim();
      cores.add(`${read('physical_package_id')}:${read('core_id')}`);
    }
  } catch {
    return logical;
  }
  return Math.max(1, Math.min(cores.size, logical));
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      negative: { type: 'string', default: '' },
      steps: { type: 'string' },
      guidance: { type: 'string', default: '7.5' },
      width: { type: 'string' },
      height: { type: 'string' },
      seed: { type: 'string', default: '0' },
      scheduler: { type: 'string' },
      plan: { type: 'string' },
      out: { type: 'string', short: 'o', default: 'sdport.png' },
      threads: { type: 'string' },
      'raw-latents': { type: 'string' },
      quiet: { type: 'boolean', short: 'q', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return;
  }
  if (positionals.length !== 2) fail(`expected MODEL_DIR and PROMPT\n${USAGE}`);
  const [folder, prompt] = positionals;
  const say = values.quiet ? () => {} : (m) => process.stderr.write(`${m}\n`);
  const threads = number(values.threads, 'threads') || physicalCores();

  const env = {
    ort,
    Tokenizer,
    say,
    async readJson(rel, { optional = false } = {}) {
      const file = path.join(folder, rel);
      const data = readJsonFile(file);
      if (data === undefined && !optional) fail(`${file} not found; is ${folder} a folder written by \`sdport export\`?`);
      return data;
    },
    async createSession(name, spec) {
      const file = path.join(folder, spec.file);
      if (!fs.existsSync(file)) fail(`${name}: ${file} not found; re-export the model`);
      // The Python runtime's session options (sdport/runtime/sessions.py): EXTENDED optimization,
      // sequential execution; the arena only for graphs fused at export, and never for the VAE's
      // (its NO_ARENA: few, huge activations, 0.9 GB more peak at 512 px with the arena).
      return ort.InferenceSession.create(file, {
        graphOptimizationLevel: 'extended',
        executionMode: 'sequential',
        intraOpNumThreads: threads,
        interOpNumThreads: 1,
        enableCpuMemArena: spec.optimization === 'ort' && !['vae_decoder', 'vae_encoder'].includes(name),
        logSeverityLevel: 3,
      });
    },
  };

  const manifest = await readManifest(env);
  let plan;
  if (values.plan) {
    plan = readJsonFile(values.plan);
    if (plan === undefined) fail(`plan ${values.plan} not found`);
  } else {
    const config = await env.readJson(manifest.scheduler_config || 'scheduler/scheduler_config.json');
    const scheduler = values.scheduler || schedulerForConfig(config);
    if (!scheduler) fail(`the folder's scheduler ${config._class_name} has no sdport name; pass --scheduler`);
    const steps = number(values.steps, 'steps') ?? 25;
    const file = path.join(folder, 'plans', `${scheduler}-${steps}.json`);
    plan = readJsonFile(file);
    if (plan === undefined) {
      fail(`no plan for ${scheduler} with ${steps} steps at ${file}; write it once with\n` +
        `  sdport plan ${folder} --scheduler ${scheduler} --steps ${steps}\nor pass --plan FILE`);
    }
  }
  if (values.scheduler && plan.scheduler !== values.scheduler) fail(`--scheduler ${values.scheduler} but the plan is for ${plan.scheduler}`);
  if (values.steps && plan.steps !== number(values.steps, 'steps')) fail(`--steps ${values.steps} but the plan has ${plan.steps} steps`);

  const request = {
    manifest,
    prompt,
    negative: values.negative,
    guidance: number(values.guidance, 'guidance', false),
    width: number(values.width, 'width'),
    height: number(values.height, 'height'),
    seed: values.seed,
    plan,
  };
  const started = performance.now();
  const result = await generate(env, request);
  const parameters = [
    prompt,
    ...(values.negative ? [`Negative prompt: ${values.negative}`] : []),
    `Steps: ${plan.steps}, Sampler: ${plan.scheduler}, CFG scale: ${request.guidance}, Seed: ${values.seed}, ` +
      `Size: ${result.width}x${result.height}, Model: ${path.basename(path.resolve(folder))}, Software: sdport (node)`,
  ].join('\n');
  fs.writeFileSync(values.out, encodePng(result.rgb, result.width, result.height, { parameters }));
  if (values['raw-latents']) fs.writeFileSync(values['raw-latents'], Buffer.from(result.latents.buffer));
  say(`wrote ${values.out} (${((performance.now() - started) / 1000).toFixed(1)} s)`);
}

main().catch((err) => fail(err && err.message ? err.message : String(err)));
