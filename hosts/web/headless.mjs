#!/usr/bin/env node
// Runs the browser host in headless Chromium and saves what the page made (tests, benchmarks).
//
//   node hosts/web/headless.mjs MODEL_DIR JOBS.json OUT_DIR
//
// JOBS.json: [{"name": "euler", "params": {"prompt": "...", "scheduler": "euler", "steps": 4, ...}},
//             {"name": "ids", "tokenize": ["a prompt", ...]}, ...]
// Writes OUT_DIR/<name>.png (+ <name>.json with timings and the progress log) per image job and
// OUT_DIR/<name>.json (token ids) per tokenize job. Chromium: $CHROMIUM or /usr/bin/chromium.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { startServer } from './serve.mjs';
import { encodePng } from '../node/png.mjs';

const [modelDir, jobsFile, outDir] = process.argv.slice(2);
if (!outDir) {
  console.error('usage: node hosts/web/headless.mjs MODEL_DIR JOBS.json OUT_DIR');
  process.exit(2);
}
const jobs = JSON.parse(fs.readFileSync(jobsFile, 'utf8'));
const timeoutMs = Number(process.env.SDPORT_PAGE_TIMEOUT_MS || 600000);
fs.mkdirSync(outDir, { recursive: true });

const server = await startServer(modelDir, 0);
const base = `http://localhost:${server.address().port}/web/index.html`;
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'sdport-chromium-'));
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: [
    '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage',
  ],
});
let failed = 0;
try {
  const context = await browser.newContext();
  for (const job of jobs) {
    const page = await context.newPage();
    const console_ = [];
    page.on('console', (m) => console_.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => console_.push(`pageerror: ${e.message}`));
    const started = Date.now();
    if (job.tokenize) {
      await page.goto(base);
      const ids = await page.evaluate((p) => window.sdportTokenize(p), job.tokenize);
      fs.writeFileSync(path.join(outDir, `${job.name}.json`), JSON.stringify(ids));
      console.log(`${job.name}: ${ids.length} prompts tokenized`);
    } else {
      const query = new URLSearchParams({ ...job.params, auto: '1' });
      await page.goto(`${base}?${query}`);
      await page.waitForFunction(() => ['done', 'error'].includes(window.sdport.state), null, { timeout: timeoutMs, polling: 200 });
      const state = await page.evaluate(() => window.sdport);
      const isolated = await page.evaluate(() => self.crossOriginIsolated);
      const meta = { ...state, result: undefined, crossOriginIsolated: isolated, wall_s: (Date.now() - started) / 1000, console: console_ };
      if (state.state === 'done') {
        const { width, height, rgb } = state.result;
        meta.seconds = state.result.seconds;
        fs.writeFileSync(path.join(outDir, `${job.name}.png`), encodePng(Buffer.from(rgb, 'base64'), width, height));
        console.log(`${job.name}: ${width}x${height} in ${meta.wall_s.toFixed(1)} s`);
      } else {
        failed++;
        console.log(`${job.name}: error: ${state.error}\n  ${console_.join('\n  ')}`);
      }
      fs.writeFileSync(path.join(outDir, `${job.name}.json`), JSON.stringify(meta, null, 1));
    }
    await page.close();
  }
} finally {
  await browser.close();
  server.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
