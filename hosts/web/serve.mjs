#!/usr/bin/env node
// Static server for the browser host: hosts/ at /, MODEL_DIR at /model/, localhost only.
//
//   node hosts/web/serve.mjs MODEL_DIR [--port 8080]   then open http://localhost:8080/web/
//
// Sends COOP/COEP headers so the page is cross-origin isolated and onnxruntime-web can use
// WASM threads (SharedArrayBuffer).

import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const HOSTS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.json': 'application/json; charset=utf-8',
  '.wasm': 'application/wasm',
  '.png': 'image/png',
};

/** The file a URL path names, or null when it is outside the two served roots. */
function resolve(modelDir, urlPath) {
  let rel;
  try {
    rel = decodeURIComponent(urlPath.split('?')[0]);
  } catch {
    return null;
  }
  const [root, rest] = rel.startsWith('/model/') ? [modelDir, rel.slice('/model/'.length)] : [HOSTS, rel.slice(1)];
  const file = path.resolve(root, rest || '.');
  if (file !== root && !file.startsWith(root + path.sep)) return null;
  return file;
}

/** Starts serving; resolves to the http.Server (listening on 127.0.0.1). */
export function startServer(modelDir, port = 8080) {
  const root = path.resolve(modelDir);
  const server = http.createServer((req, res) => {
    res.setHeader('Cross-Origin-Opener-Policy', 'same-origin');
    res.setHeader('Cross-Origin-Embedder-Policy', 'require-corp');
    res.setHeader('Cross-Origin-Resource-Policy', 'same-origin');
    res.setHeader('Cache-Control', 'no-store');
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405).end();
      return;
    }
    let file = resolve(root, req.url);
    if (file && fs.existsSync(file) && fs.statSync(file).isDirectory()) file = path.join(file, 'index.html');
    if (!file || !fs.existsSync(file)) {
      res.writeHead(404, { 'Content-Type': 'text/plain' }).end(`not found: ${req.url}\n`);
      return;
    }
    const size = fs.statSync(file).size;
    res.writeHead(200, {
      'Content-Type': TYPES[path.extname(file)] || 'application/octet-stream',
      'Content-Length': size,
    });
    if (req.method === 'HEAD') res.end();
    else fs.createReadStream(file).pipe(res);
  });
  return new Promise((ok, fail) => {
    server.once('error', fail);
    server.listen(port, '127.0.0.1', () => ok(server));
  });
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const { values, positionals } = parseArgs({ allowPositionals: true, options: { port: { type: 'string', default: '8080' } } });
  if (positionals.length !== 1) {
    console.error('usage: node hosts/web/serve.mjs MODEL_DIR [--port 8080]');
    process.exit(2);
  }
  const server = await startServer(positionals[0], Number(values.port));
  console.log(`serving ${path.resolve(positionals[0])}: open http://localhost:${server.address().port}/web/`);
}
