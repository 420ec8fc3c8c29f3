"""The JavaScript hosts reproduce the Python runtime: Node (onnxruntime-node) and the browser page
(onnxruntime-web WASM in headless Chromium), on the tiny model, from the contract alone.

The Python reference is built here from the same parts a host uses (ClipTokenizer, onnxruntime
sessions, `run_plan`, `PortableNoise`), and checked against `Pipeline.generate` given the same
latents. Needs `node`; the Node packages are installed with `npm ci` in hosts/ when missing, and
the page needs Chromium: $CHROMIUM names a binary; otherwise `chromium`, installed with apt-get
when missing where that can be done (a root shell on Debian or Ubuntu, as on CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from sdport.runtime import images as imgs
from sdport.runtime.noise import PortableNoise
from sdport.runtime.plans import folder_config, run_plan, sampling_plan, write_folder_plans
from sdport.runtime.options import physical_cores
from sdport.runtime.tokenizer import ClipTokenizer

HOSTS = Path(__file__).resolve().parent.parent / "hosts"
NODE = shutil.which("node")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")

# Node's onnxruntime computes the same bits as Python's with the same intra-op thread count
# (measured: 0 pixels and 0 latents differ; 1 thread vs 2 moved latents by 2e-6). WASM kernels
# (1 thread) round a few values differently: measured at most 1 level in <= 0.03% of pixels (the
# page runs the guided UNet as two batch-1 calls; with one thread that alone changed no bits in
# Python's onnxruntime on the tiny model). A plan differs from `denoise` by float32 rounding
# (~1e-6): measured at most 1 level in <= 0.02%.
NODE_TOLERANCE = 0  # levels of 255, host vs the Python reference from the same parts
PAGE_TOLERANCE = 1
PIPELINE_TOLERANCE = 1  # the Python reference vs Pipeline.generate(latents=...)
MAX_DIFFERING = 0.005  # fraction of pixel channels allowed to differ at all

THREADS = physical_cores()  # the Python runtime's (and the Node host's default) intra-op threads

JOBS = {
    # name: scheduler, steps, seed, width, height, guidance, prompt, negative
    "euler": ("euler", 4, 1, 64, 64, 7.5, "a red fox in the snow", ""),
    "dpmpp_2m": ("dpmpp_2m", 5, 2, 64, 48, 5.0, "an astronaut riding a horse", "blurry, low quality"),
    "euler_ancestral": ("euler_ancestral", 6, 3, 48, 64, 7.5, "Σίσυφος ΟΔΥΣΣΕΥΣ", "ugly"),
    "unguided": ("euler", 3, 4, 64, 64, 1.0, "a lighthouse", ""),
    # two evaluations a step, a noise draw every second one, Karras sigmas
    "dpm2_ancestral_karras": ("dpm2_ancestral_karras", 4, 5, 64, 64, 7.5, "a castle on a hill", "fog"),
}
DETERMINISTIC = ("euler", "dpmpp_2m", "unguided")

PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT, 4K, HDR!!!",
    "an astronaut riding a horse on mars, trending on artstation",
    "ΟΔΟΣ",
    "Σίσυφος ΟΔΥΣΣΕΥΣ ΣΑΣ",
    "ΣΣ Σ σ ς",
    "café déjà vu, naïve façade",
    "Crème Brûlée à la Française",
    "straße groß ẞ",
    "İstanbul IŞIK ıi",
    "ﬁne ﬂour ligatures",
    "e\u0301 combining acute vs é",
    "東京の夜景、ネオン",
    "北京烤鸭 and 한국어 문장",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "emoji 🦊🔥👩‍🚀 party",
    "tabs\tand\nnewlines   and    spaces",
    "  leading and trailing spaces  ",
    "it's what they'd've done, y'all'll see",
    "don't won't can't SHOULDN'T",
    "numbers 1234567890 3.14159 1e-5",
    "(masterpiece:1.2), [[best quality]], {detailed}",
    "a <|endoftext|> in the middle",
    "<|startoftext|>literal start",
    "HTML &amp; entities &lt;b&gt;",
    "full-width ＡＢＣ１２３！",
    "math ∑∫√∞ ≤ ≥ ≠ ± × ÷",
    "under_score-hyphen/slash\\backslash",
    "repeated !!!!!!!!!! ?????? ......",
    "word " * 100,  # truncated: 75 text tokens kept, then the end token
    "a very long prompt " + "with many different words like lighthouse cliff dusk ocean waves " * 8,
]


def run(cmd: list[str], timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:3])}... failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """hosts/node_modules, installed from package-lock.json when missing."""
    wanted = ("onnxruntime-node", "onnxruntime-web", "@huggingface/tokenizers", "playwright-core")
    if not all((HOSTS / "node_modules" / name / "package.json").exists() for name in wanted):
        npm = shutil.which("npm")
        assert npm, "npm is missing: install Node.js with npm to run the host tests"
        # onnxruntime-node's install script would download CUDA binaries; the CPU ones ship inside.
        env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
        run([npm, "ci", "--no-audit", "--no-fund"], timeout=900, cwd=HOSTS, env=env)
    return HOSTS / "node_modules"


@pytest.fixture(scope="module")
def chromium() -> str:
    """A Chromium binary: $CHROMIUM, or `chromium`, installed with apt-get when it is missing and
    that can be done (root, apt-get present): the one place, CI included, that installs it."""
    root = getattr(os, "geteuid", lambda: -1)() == 0  # no geteuid on Windows
    installable = not os.environ.get("CHROMIUM") and root and shutil.which("apt-get")
    if not Path(CHROMIUM).exists() and installable:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], timeout=600, env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], timeout=900, env=env)
    assert Path(CHROMIUM).exists(), (
        f"Chromium not found at {CHROMIUM}: apt-get install -y --no-install-recommends chromium, "
        "or set CHROMIUM to a Chromium/Chrome binary"
    )
    return CHROMIUM


@pytest.fixture(scope="module")
def model(tiny_onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny model with the jobs' plans in plans/ (where hosts look for them)."""
    folder = tmp_path_factory.mktemp("hosts") / "tiny"
    shutil.copytree(tiny_onnx_dir, folder)
    for scheduler, steps, *_ in JOBS.values():
        write_folder_plans(folder, [scheduler], [steps])
    return folder


def reference(folder: Path, job: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image [H, W, 3], latents) from the contract's parts, in Python."""
    scheduler, steps, seed, width, height, guidance, prompt, negative = job
    manifest = json.loads((folder / "sdport.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS  # results can depend on the thread count in the last bit
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED

    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(folder / manifest["graphs"][name]["file"]), options,
                                    providers=["CPUExecutionProvider"])

    guided = guidance > 1
    ids = ClipTokenizer.load(folder / "tokenizer", manifest["max_tokens"]).encode(
        [negative, prompt] if guided else [prompt])
    hidden = session("text_encoder").run(["last_hidden_state"], {"input_ids": ids})[0]
    unet = session("unet")
    g = np.float32(guidance)

    def model_fn(x: np.ndarray, t: float) -> np.ndarray:
        sample = np.concatenate([x, x]) if guided else x
        out = unet.run(["out_sample"], {"sample": sample, "timestep": np.asarray(t, np.float32),
                                        "encoder_hidden_states": hidden})[0]
        return out[:1] + g * (out[1:] - out[:1]) if guided else out

    noise = PortableNoise(seed)
    latents = noise.standard_normal((1, manifest["latent_channels"], height // 8, width // 8))
    plan = json.loads(json.dumps(sampling_plan(scheduler, folder_config(folder), steps)))
    x = run_plan(plan, model_fn, latents, rng=noise)
    decoded = session("vae_decoder").run(["sample"], {"latent_sample": x / np.float32(manifest["vae_scaling_factor"])})[0]
    return (imgs.postprocess(decoded)[0] * 255).round().astype(np.uint8), x


def node_image(folder: Path, job: tuple, out: Path) -> tuple[np.ndarray, np.ndarray]:
    scheduler, steps, seed, width, height, guidance, prompt, negative = job
    png, raw = out.with_suffix(".png"), out.with_suffix(".latents")
    run([NODE, str(HOSTS / "node" / "sdport.mjs"), str(folder), prompt, "--negative", negative,
         "--scheduler", scheduler, "--steps", str(steps), "--seed", str(seed), "--guidance", str(guidance),
         "--width", str(width), "--height", str(height), "--out", str(png), "--raw-latents", str(raw),
         "--threads", str(THREADS), "--quiet"])
    return np.asarray(Image.open(png).convert("RGB")), np.fromfile(raw, dtype=np.float32)


def assert_image_close(ours: np.ndarray, ref: np.ndarray, tolerance: int) -> None:
    assert ours.shape == ref.shape
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    message = f"max pixel difference {diff.max()} (tolerance {tolerance}), {np.mean(diff > 0):.3%} differ"
    assert diff.max() <= tolerance and np.mean(diff > 0) <= MAX_DIFFERING, message


@pytest.mark.parametrize("name", list(JOBS))
def test_node_host_matches_python(name, node_modules, model, tmp_path):
    ref, ref_latents = reference(model, JOBS[name])
    image, latents = node_image(model, JOBS[name], tmp_path / name)
    np.testing.assert_array_equal(latents, ref_latents.ravel())  # measured: bit for bit
    assert_image_close(image, ref, NODE_TOLERANCE)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_reference_matches_pipeline(name, model):
    """The parts above are the Python runtime: Pipeline.generate with the same latents agrees."""
    from sdport.runtime.pipeline import Pipeline

    scheduler, steps, seed, width, height, guidance, prompt, negative = JOBS[name]
    latents = PortableNoise(seed).standard_normal((1, 4, height // 8, width // 8))
    images = Pipeline.load(model, provider="cpu").generate(
        prompt=prompt, negative_prompt=negative, steps=steps, guidance=guidance, width=width, height=height,
        seed=seed, scheduler=scheduler, latents=latents, output="np", progress=False,
    )
    pipeline_image = (images[0] * 255).round().astype(np.uint8)
    assert_image_close(reference(model, JOBS[name])[0], pipeline_image, PIPELINE_TOLERANCE)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral"])
def test_seeded_pipeline_matches_hosts(name, model):
    """Once the pipeline draws seeded noise from PortableNoise, `seed` alone gives the hosts' image."""
    from sdport.runtime import pipeline

    if getattr(pipeline, "BatchNoise", None) is None:
        pytest.skip("sdport.runtime.pipeline does not use sdport.runtime.noise.BatchNoise yet")
    scheduler, steps, seed, width, height, guidance, prompt, negative = JOBS[name]
    images = pipeline.Pipeline.load(model, provider="cpu").generate(
        prompt=prompt, negative_prompt=negative, steps=steps, guidance=guidance, width=width, height=height,
        seed=seed, scheduler=scheduler, output="np", progress=False,
    )
    pipeline_image = (images[0] * 255).round().astype(np.uint8)
    assert_image_close(reference(model, JOBS[name])[0], pipeline_image, PIPELINE_TOLERANCE)


def test_node_finds_plans_and_explains_missing_ones(node_modules, model, tmp_path):
    done = subprocess.run([NODE, str(HOSTS / "node" / "sdport.mjs"), str(model), "x", "--scheduler", "heun",
                           "--steps", "7", "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"sdport plan {model} --scheduler heun --steps 7" in done.stderr


def test_js_noise_and_tokenizer(node_modules, model):
    """hosts/js gives the spec's noise bits and Python's token ids (Node)."""
    script = f"""
    import {{ PortableNoise }} from {json.dumps(str(HOSTS / 'js' / 'noise.mjs'))};
    import {{ loadTokenizer }} from {json.dumps(str(HOSTS / 'js' / 'pipeline.mjs'))};
    import {{ Tokenizer }} from '@huggingface/tokenizers';
    import fs from 'node:fs';
    const folder = {json.dumps(str(model))};
    const env = {{ Tokenizer, readJson: async (rel, o = {{}}) => {{
      try {{ return JSON.parse(fs.readFileSync(folder + '/' + rel, 'utf8')); }}
      catch (e) {{ if (o.optional) return undefined; throw e; }} }} }};
    const manifest = JSON.parse(fs.readFileSync(folder + '/sdport.json', 'utf8'));
    const tok = await loadTokenizer(env, manifest);
    const prompts = JSON.parse(fs.readFileSync(0, 'utf8'));
    const noise = {{}};
    for (const [seed, stream] of [[0, 0], [0, 1], [42, 0], [42, 1], ['18446744073709551615', 4294967295]]) {{
      const g = new PortableNoise(seed, stream);
      noise[`${{seed}}-${{stream}}`] = [Array.from(g.standardNormal(100003)), Array.from(g.standardNormal(7))];
    }}
    console.log(JSON.stringify({{ ids: prompts.map((p) => Array.from(tok.encode(p), Number)), noise }}));
    """
    done = subprocess.run([NODE, "--input-type=module", "-e", script], input=json.dumps(PROMPTS),
                          capture_output=True, text=True, timeout=120, cwd=HOSTS / "node")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    for key, (first, second) in result["noise"].items():
        seed, stream = (int(v) for v in key.split("-"))
        g = PortableNoise(seed, stream)
        np.testing.assert_array_equal(np.array(first, dtype=np.float32), g.standard_normal(100003))
        np.testing.assert_array_equal(np.array(second, dtype=np.float32), g.standard_normal(7))
    expected = ClipTokenizer.load(model / "tokenizer", 77).encode(PROMPTS)
    mismatched = [p for p, ours, ref in zip(PROMPTS, result["ids"], expected) if ours != ref.tolist()]
    assert not mismatched, f"{len(mismatched)}/{len(PROMPTS)} prompts tokenized differently: {mismatched}"


def test_page_matches_python(node_modules, model, chromium, tmp_path):
    """The browser page (onnxruntime-web WASM, headless Chromium) makes the same images and ids."""
    jobs = []
    for name, (scheduler, steps, seed, width, height, guidance, prompt, negative) in JOBS.items():
        params = {"prompt": prompt, "negative": negative, "scheduler": scheduler, "steps": steps, "seed": seed,
                  "width": width, "height": height, "guidance": guidance}
        jobs.append({"name": name, "params": {k: str(v) for k, v in params.items()}})
    jobs.append({"name": "ids", "tokenize": PROMPTS})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    out = tmp_path / "out"
    run([NODE, str(HOSTS / "web" / "headless.mjs"), str(model), str(tmp_path / "jobs.json"), str(out)],
        timeout=600, env={**os.environ, "CHROMIUM": chromium})
    for name, job in JOBS.items():
        meta = json.loads((out / f"{name}.json").read_text())
        assert meta["state"] == "done", meta
        evaluations = len(sampling_plan(job[0], folder_config(model), job[1])["evaluations"])  # dpm2: 2N - 1
        assert meta["log"][-1] == "done" and f"step {evaluations}/{evaluations}" in meta["log"]  # the progress line
        image = np.asarray(Image.open(out / f"{name}.png").convert("RGB"))
        assert_image_close(image, reference(model, job)[0], PAGE_TOLERANCE)
    ids = json.loads((out / "ids.json").read_text())
    assert ids == ClipTokenizer.load(model / "tokenizer", 77).encode(PROMPTS).tolist()
