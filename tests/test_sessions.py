"""Providers, session options, and the checks made before a graph is loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sdport.errors import UsageError
from sdport.models.manifest import ManifestError
from sdport.runtime import Pipeline
from sdport.runtime.graph_files import check_graph_files, external_data_locations
from sdport.runtime.sessions import available_providers, resolve_provider

HAVE = ort.get_available_providers()


def test_auto_picks_the_best_available_and_says_which():
    notes = []
    chosen = resolve_provider("auto", notes.append)
    assert chosen == available_providers()[0]
    assert chosen in notes[0]


def test_unknown_or_missing_provider_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown provider 'tpu'.*installed here: .*cpu"):
        resolve_provider("tpu")
    for name, full in (("cuda", "CUDAExecutionProvider"), ("dml", "DmlExecutionProvider")):
        if full not in HAVE:
            with pytest.raises(UsageError, match=f"{full}.*not installed.*available: .*cpu"):
                resolve_provider(name)


def test_device_runs_give_what_session_run_gives(tiny_onnx_dir, monkeypatch):
    # The CUDA path's bookkeeping on CPU buffers: a slot per input shape, a kept input copied in
    # only when its version changed (also into a shape run before the change), and the least
    # recently used shape dropped past device_runs.PLAIN_SLOTS, then made again when it returns.
    from sdport.runtime import device_runs

    monkeypatch.setattr(device_runs, "PLAIN_SLOTS", 2)
    session = ort.InferenceSession(str(tiny_onnx_dir / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    runs = device_runs.DeviceRuns("unet", session, captured=False, device="cpu")
    rng = np.random.default_rng(0)
    texts = {1: rng.standard_normal((2, 77, 32), dtype=np.float32),
             2: rng.standard_normal((2, 77, 32), dtype=np.float32)}
    kept = None
    for size, version in ((8, 1), (8, 1), (16, 1), (8, 2), (16, 2), (12, 2), (8, 2), (8, 1)):
        if version != kept:
            runs.keep("encoder_hidden_states", texts[version])
            kept = version
        feeds = {"sample": rng.standard_normal((2, 4, size, size), dtype=np.float32),
                 "timestep": np.array(rng.integers(0, 1000), dtype=np.float32)}
        got = runs.run(feeds)[0]
        feeds["encoder_hidden_states"] = texts[version]
        np.testing.assert_allclose(got, session.run(None, feeds)[0], rtol=0, atol=1e-6, err_msg=f"{size} v{version}")
        assert len(runs.slots) <= 2
    assert [key[1][1][2] for key in runs.slots] == [12, 8]  # sample's height: 16 was dropped


@pytest.mark.parametrize("sample_dtype, through_graph_run", [(np.float32, False), (np.float64, True)])
def test_repeated_runs_give_what_graph_run_gives(tiny_onnx_dir, session_runs, monkeypatch, sample_dtype,
                                                 through_graph_run):
    """Graph.repeated reads its fixed inputs at each run, as they are then (the loop rewrites the
    sample in place), whether it runs onnxruntime directly (a float32 sample) or through Graph.run
    (a float64 one, which Graph.run must cast at each run); only its last run releases memory."""
    from sdport.runtime.sessions import Graph

    graph = Graph("unet", tiny_onnx_dir / "unet" / "model.onnx", "cpu", fused=True)
    graph_runs = []
    real_run = Graph.run
    monkeypatch.setattr(Graph, "run", lambda self, feeds, last=False: graph_runs.append(last) or real_run(self, feeds, last))
    rng = np.random.default_rng(0)
    sample = np.empty((2, 4, 8, 8), dtype=sample_dtype)
    text = rng.standard_normal((2, 77, 32), dtype=np.float32)
    timesteps = [981.0, 501.0, 21.0]
    run = graph.repeated("out_sample", {"sample": sample, "encoder_hidden_states": text},
                         [{"timestep": np.array(t, dtype=np.float32)} for t in timesteps])
    for k, t in enumerate(timesteps):
        sample[...] = rng.standard_normal(sample.shape)
        got = run(k)
        assert [last for _, _, last in session_runs.runs] == [k == len(timesteps) - 1]  # one run, last once
        assert graph_runs == ([k == len(timesteps) - 1] if through_graph_run else [])
        expected = graph.run({"sample": sample, "timestep": np.float32(t), "encoder_hidden_states": text})["out_sample"]
        np.testing.assert_array_equal(got, expected)
        session_runs.runs.clear()
        graph_runs.clear()


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in HAVE,
    reason="CUDAExecutionProvider not installed (needs onnxruntime-gpu and an NVIDIA GPU)",
)
def test_cuda_generates_like_cpu(tiny_onnx_dir):
    # Each input shape runs on device buffers of its own, the text embeddings copied in only when
    # they change: new prompts must reach a shape already run, and going back to a size must reuse
    # its buffers with the current inputs.
    kwargs = dict(steps=4, scheduler="euler", output="np", progress=False, seed=1)
    on_gpu = Pipeline.load(tiny_onnx_dir, provider="cuda")
    on_cpu = Pipeline.load(tiny_onnx_dir, provider="cpu")
    requests = [("a fox", 64, 1, 7.5), ("a red fox", 64, 1, 7.5), ("a fox", 128, 1, 7.5),
                ("a fox", 64, 2, 7.5), ("a fox", 64, 1, 1.0), ("a red fox", 64, 1, 7.5)]
    for prompt, size, count, guidance in requests:
        request = dict(width=size, height=size, num_images=count, guidance=guidance, **kwargs)
        got, want = on_gpu.generate(prompt, **request), on_cpu.generate(prompt, **request)
        # CUDA runs fp32 convolutions and matmuls in TF32 (options.cuda_provider_options): on an H100
        # pixels moved by up to 7.4e-3 (mean 7e-4) from the CPU's, by 3.5e-6 with TF32 turned off.
        # A stale input would show: "a fox" and "a red fox" differ by up to 0.13 here.
        difference = np.abs(got - want)
        assert difference.max() < 2e-2 and difference.mean() < 2e-3, (prompt, size, count, guidance,
                                                                       difference.max(), difference.mean())
    assert len(on_gpu._graphs["unet"]._device_runs.slots) == 4  # 64 px x2, 128 px x2, 64 px x4, 64 px x1


@pytest.fixture(scope="module")
def tiny_fp16_dir(tiny_diffusers_dir: Path, tmp_path_factory) -> Path:
    from sdport.export.folder import export_model

    return export_model(tiny_diffusers_dir, tmp_path_factory.mktemp("fp16") / "onnx", fp16=True, report=None)


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in HAVE,
    reason="CUDAExecutionProvider not installed (needs onnxruntime-gpu and an NVIDIA GPU)",
)
def test_cuda_graphs_replay_what_plain_cuda_runs(tiny_fp16_dir, tiny_onnx_dir):
    # Each image size and batch is its own captured graph on its own device buffers; new text
    # embeddings must reach a graph already captured, and going back to a size must replay its graph.
    # The GPU export: an fp32 one's UNet has If nodes (its guided prefix), which CUDA graphs can't hold.
    kwargs = dict(steps=4, scheduler="euler", output="np", progress=False, seed=1)
    captured = Pipeline.load(tiny_fp16_dir, provider="cuda", cuda_graphs=True)
    plain = Pipeline.load(tiny_fp16_dir, provider="cuda")
    unet = captured._graphs["unet"]
    assert unet.cuda_graphs and not plain._graphs["unet"].cuda_graphs
    requests = [("a fox", 64, 1, 7.5), ("a red fox", 64, 1, 7.5), ("a fox", 128, 1, 7.5),
                ("a fox", 64, 2, 7.5), ("a fox", 64, 1, 1.0), ("a red fox", 64, 1, 7.5)]
    for prompt, size, count, guidance in requests:
        want = plain.generate(prompt, width=size, height=size, num_images=count, guidance=guidance, **kwargs)
        got = captured.generate(prompt, width=size, height=size, num_images=count, guidance=guidance, **kwargs)
        # Equal on an H100; the margin is for cuDNN picking other TF32 algorithms in another session.
        # A stale input would show: "a fox" and "a red fox" differ by up to 0.13 here.
        np.testing.assert_allclose(got, want, atol=2e-3, err_msg=f"{prompt!r} {size}px x{count} g={guidance}")
    assert not unet._device_runs.failed
    assert len(unet._device_runs.slots) == 4  # 64 px x2, 128 px x2, 64 px x4, 64 px x1 (no guidance)
    assert not Pipeline.load(tiny_fp16_dir, provider="cuda", low_memory=True, cuda_graphs=True).cuda_graphs
    # An fp32 folder's UNet opens without them (with a note) and still generates.
    fallback = Pipeline.load(tiny_onnx_dir, provider="cuda", cuda_graphs=True)
    assert not fallback._graphs["unet"].cuda_graphs
    assert np.isfinite(fallback.generate("a fox", **kwargs)).all()


@pytest.mark.skipif(
    "DmlExecutionProvider" not in HAVE,
    reason="DmlExecutionProvider not installed (needs onnxruntime-directml on Windows)",
)
def test_directml_generates(tiny_onnx_dir):
    images = Pipeline.load(tiny_onnx_dir, provider="dml").generate("a fox", steps=2, output="np", progress=False)
    assert images.shape == (1, 64, 64, 3)


def external_model(folder: Path, location: str) -> Path:
    """A one-initializer ONNX model whose weights live in `location` (relative to the model)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4,), np.float32), "w")
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight],
    )
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    path = folder / "unet" / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_external_data_must_stay_in_the_folder(tmp_path):
    folder = tmp_path / "model"
    (tmp_path / "outside.bin").write_bytes(np.ones(4, np.float32).tobytes())
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.bin").write_bytes(np.ones(4, np.float32).tobytes())

    external_model(folder, "weights.bin")
    assert external_data_locations(folder / "unet" / "model.onnx") == ["weights.bin"]
    check_graph_files(folder, "unet/model.onnx")

    for location in ("../../outside.bin", str(tmp_path / "outside.bin")):
        external_model(folder, location)
        with pytest.raises(ManifestError, match="outside the model folder"):
            check_graph_files(folder, "unet/model.onnx")

    (folder / "unet" / "link.bin").symlink_to(tmp_path / "outside.bin")
    external_model(folder, "link.bin")
    with pytest.raises(ManifestError, match="outside the model folder"):
        check_graph_files(folder, "unet/model.onnx")


def test_graph_io_is_checked_at_load(tiny_onnx_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_onnx_dir, folder)
    data = json.loads((folder / "sdport.json").read_text())
    data["text_embed_dim"] = 768  # the graphs say 32
    (folder / "sdport.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="text_encoder: output 'last_hidden_state'.* 32 at axis 2.* says 768"):
        Pipeline.load(folder, provider="cpu")
    with pytest.raises(ManifestError, match="says 768"):  # low_memory checks the manifest's I/O
        Pipeline.load(folder, provider="cpu", low_memory=True)


def test_request_checks(tiny_onnx_dir):
    pipe = Pipeline.load(tiny_onnx_dir, provider="cpu")
    bad = [
        (dict(width=72), "width 72 is not a multiple of 16.*use 64 or 80"),
        (dict(height=0), "height must be an integer of at least 16"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(guidance=float("nan")), "guidance must be a finite number"),
        (dict(scheduler="k_euler"), "unknown scheduler 'k_euler'; choose one of: .*euler_ancestral"),
        (dict(scheduler="ddim_karras"), "scheduler 'ddim' has no Karras sigmas variant; choose one of: .*euler_karras"),
        (dict(scheduler=5), "unknown scheduler 5"),
        (dict(image=np.zeros((64, 64, 3))), "input image"),
        (dict(latents=np.zeros((1, 4, 4, 4))), r"latents has shape \(1, 4, 4, 4\), wants \(1, 4, 8, 8\)"),
        (dict(latents=np.full((1, 4, 8, 8), np.nan)), "latents contains NaN"),
        (dict(seed=-1), "seed must be a non-negative integer"),
        (dict(output="jpg"), "output must be 'pil' or 'np'"),
    ]
    for kwargs, message in bad:
        with pytest.raises(UsageError, match=message):
            pipe.generate("a fox", progress=False, **kwargs)
    from PIL import Image

    image = Image.new("RGB", (64, 64))
    with pytest.raises(UsageError, match=r"strength must be in \[0, 1\]"):
        pipe.generate("a fox", image=image, strength=1.5, progress=False)
    with pytest.raises(UsageError, match="leaves no denoising step"):
        pipe.generate("a fox", image=image, strength=0.05, steps=10, progress=False)


def test_nan_from_a_component_names_it(tiny_onnx_dir, session_runs):
    pipe = Pipeline.load(tiny_onnx_dir, provider="cpu")
    session_runs.alter = lambda graph, outputs: (
        {"out_sample": np.full_like(outputs["out_sample"], np.nan)} if graph == "unet" else None)
    from sdport.errors import SdportError

    with pytest.raises(SdportError, match="unet: output has NaN or inf at step 1"):
        pipe.generate("a fox", steps=3, progress=False)


def _status_mb(field: str = "VmRSS") -> float:
    """A memory figure of this process from /proc/self/status (resident set by default)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def _resident_mb() -> float:
    return _status_mb()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from Linux's /proc")
def test_last_run_returns_the_arena_to_the_os(tmp_path):
    """A graph with the CPU arena keeps its working memory between runs (that is the arena's
    point), reuses it on the next run instead of adding a planned block beside it, and gives it
    back after a run marked `last`, with the same outputs."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from sdport.runtime.sessions import Graph

    n = 32 * 1024 * 1024  # 128 MB per intermediate
    nodes = [helper.make_node("Sin", ["x"], ["a"]), helper.make_node("Cos", ["a"], ["b"]),
             helper.make_node("Mul", ["a", "b"], ["c"]), helper.make_node("ReduceSum", ["c"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.linspace(0, 1, n, dtype=np.float32)

    kept = Graph("unet", path, "cpu", fused=True)  # fused graphs run with the arena
    first = kept.run({"x": x})["y"]
    before = _resident_mb()
    again = kept.run({"x": x})["y"]
    held = _resident_mb()
    released = kept.run({"x": x}, last=True)["y"]
    after = _resident_mb()
    assert first == again == released
    assert held > before - 32  # a plain run keeps the arena's blocks
    assert held < before + 32  # and the second run fitted in them (no memory pattern block on top)
    # The last run hands memory back: the arena frees the regions it left wholly free, here one of
    # the three 128 MB intermediates'.
    assert held - after > 100

    plain = Graph("unet", path, "cpu", fused=False)  # unfused graphs run without the arena: no-op
    assert plain.run({"x": x}, last=True)["y"] == first


def _matmul_model(folder: Path, n: int, count: int = 1) -> tuple[Path, np.ndarray]:
    """`count` MatMuls in a row, each with its own n x n float32 weight in an external data file,
    and an input."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((n, n)) / n**0.5).astype(np.float32), f"w{i}")
               for i in range(count)]
    names = ["x"] + [f"h{i}" for i in range(1, count)] + ["y"]
    graph = helper.make_graph(
        [helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]]) for i in range(count)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], weights,
    )
    path = folder / "model.onnx"
    path.parent.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    return path, rng.standard_normal((1, n)).astype(np.float32)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from Linux's /proc")
def test_cache_entries_hold_the_packed_weights(tmp_path, monkeypatch):
    """The MatMul kernel packs its constant weight. From the pre-optimized cache the packed copy is
    read from the entry's file, mapped: opening the graph adds no private memory, where without
    the cache onnxruntime packs the 64 MB weight into its own. The outputs are the same."""
    from sdport.runtime.sessions import Graph

    path, x = _matmul_model(tmp_path / "model", 4096)
    monkeypatch.setenv("SDPORT_ORT_CACHE", str(tmp_path / "cache"))
    Graph("unet", path, "cpu", fused=False)  # writes the entry
    (entry_data,) = (tmp_path / "cache").glob("*/model.onnx_data")
    assert entry_data.stat().st_size > path.with_name("model.onnx_data").stat().st_size  # + the packed copy

    def opened_and_run() -> tuple[float, np.ndarray]:
        before = _status_mb("RssAnon")
        g = Graph("unet", path, "cpu", fused=False)
        grown = _status_mb("RssAnon") - before
        return grown, g.run({"x": x})["y"]

    cached_growth, cached = opened_and_run()
    monkeypatch.setenv("SDPORT_ORT_CACHE", "0")
    packed_growth, packed = opened_and_run()
    assert cached_growth < 16
    assert packed_growth > 60
    assert np.array_equal(cached, packed)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from Linux's /proc")
def test_a_graph_opened_without_prepacking_packs_nothing(tmp_path, monkeypatch):
    """Opened without `prepack`, the products pack their weights at each run: its cache entry (under
    a key of its own) holds no packed copy, opening adds no private memory even with the cache
    off, and the outputs match the packed graph's."""
    from sdport.runtime.graph_cache import graph_cache_key
    from sdport.runtime.sessions import Graph

    path, x = _matmul_model(tmp_path / "model", 4096)  # a 64 MB weight
    cache = tmp_path / "cache"
    monkeypatch.setenv("SDPORT_ORT_CACHE", str(cache))
    assert graph_cache_key(path, False, "cpu", prepack=False) != graph_cache_key(path, False, "cpu")
    packed = Graph("unet", path, "cpu", fused=False).run({"x": x})["y"]
    unpacked_graph = Graph("unet", path, "cpu", fused=False, prepack=False)
    entry_data = cache / graph_cache_key(path, False, "cpu", prepack=False) / "model.onnx_data"
    assert set(unpacked_graph.weight_files) == {str(entry_data.resolve())}
    assert entry_data.stat().st_size == path.with_name("model.onnx_data").stat().st_size
    np.testing.assert_allclose(unpacked_graph.run({"x": x})["y"], packed, rtol=1e-5, atol=1e-5)

    monkeypatch.setenv("SDPORT_ORT_CACHE", "0")
    before = _status_mb("RssAnon")
    uncached = Graph("unet", path, "cpu", fused=False, prepack=False)
    assert _status_mb("RssAnon") - before < 16  # packed at creation, this would be 64 MB more
    np.testing.assert_allclose(uncached.run({"x": x})["y"], packed, rtol=1e-5, atol=1e-5)


def test_pipeline_opens_only_the_text_encoder_without_prepacking(tiny_onnx_dir, tmp_path, monkeypatch):
    """The text encoder runs once per call: its products' weights are not packed at creation (see
    Pipeline.UNPACKED); the UNet's and VAE's are."""
    def prepacking_off(graph) -> bool:
        try:
            return graph.session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
        except RuntimeError:  # onnxruntime's answer for an entry never set
            return False

    monkeypatch.setenv("SDPORT_ORT_CACHE", str(tmp_path / "cache"))
    pipe = Pipeline.load(tiny_onnx_dir, provider="cpu")
    unpacked = {name for name, graph in pipe._graphs.items() if prepacking_off(graph)}
    assert set(pipe._graphs) >= {"text_encoder", "unet", "vae_decoder"}
    assert unpacked == {"text_encoder"}


# Run in a fresh process by test_opening_a_cache_entry_keeps_no_freed_heap: "write" makes the cache
# entry of the graph at argv[1]; "open" opens it and prints the private memory that added (MB).
OPEN_AND_MEASURE = """
import sys
from pathlib import Path
from sdport.runtime.sessions import Graph

def private_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

before = private_mb()
Graph("unet", Path(sys.argv[1]), "cpu", fused=False)
if sys.argv[2] == "open":
    print(private_mb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from Linux's /proc")
def test_opening_a_cache_entry_keeps_no_freed_heap(tmp_path):
    """Opening a cache entry, onnxruntime packs each MatMul weight again, finds the packed copy in
    the entry and frees its own. Those frees leave no memory held: eight 16 MB weights add under
    8 MB of private memory (65 MB before the heap was trimmed after opening). Measured in a
    fresh process, whose heap has not yet been grown and freed by other tests."""
    path, _ = _matmul_model(tmp_path / "model", 2048, count=8)
    env = {**os.environ, "SDPORT_ORT_CACHE": str(tmp_path / "cache")}

    def run(step: str) -> str:
        return subprocess.run([sys.executable, "-c", OPEN_AND_MEASURE, str(path), step],
                              capture_output=True, text=True, env=env, check=True, timeout=120).stdout

    run("write")  # the entry
    assert float(run("open")) < 8


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads resident memory from Linux's /proc")
def test_last_run_drops_the_weights_resident_pages(tmp_path, monkeypatch):
    """From the pre-optimized cache onnxruntime reads external weights in place from a memory map;
    after a run marked `last` their pages leave the resident set, and the next run reads them
    back with the same result. The cache's entry holds the weight as the MatMul kernel packs it, and
    that is mapped too. (Without the cache onnxruntime packs it into its own memory.)"""
    from sdport.runtime.sessions import Graph

    monkeypatch.setenv("SDPORT_ORT_CACHE", str(tmp_path / "cache"))
    path, x = _matmul_model(tmp_path / "model", 4096)  # a 64 MB weight, and activations of a few kB

    g = Graph("unet", path, "cpu", fused=False)  # no arena: only the weights move
    (data,) = g.weight_files
    assert Path(data).is_relative_to((tmp_path / "cache").resolve())
    first = g.run({"x": x})["y"]
    resident = _resident_mb()
    last = g.run({"x": x}, last=True)["y"]
    dropped = _resident_mb()
    again = g.run({"x": x})["y"]
    assert np.array_equal(first, last) and np.array_equal(first, again)
    assert resident - dropped > 60  # the 64 MB weight's pages
    assert _resident_mb() - dropped > 60  # read back in by the next run


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads resident memory from Linux's /proc")
def test_generate_leaves_no_weight_pages_resident(tiny_onnx_dir, monkeypatch):
    """Each component's weights leave the resident set after its part of a generate call (text
    encoder before the UNet steps, UNet before the decode), sessions held, images unchanged.
    The tiny model's weights are below the size worth releasing, so the test lowers it."""
    from sdport.runtime import sessions
    from sdport.runtime.resident import file_mappings

    def resident_kb(pipe: Pipeline) -> int:
        files = frozenset().union(*(g.weight_files for g in pipe._graphs.values()))
        mapped = [m for m in file_mappings() if m["path"] in files]
        assert mapped
        return sum(m["Rss"] for m in mapped)

    small = Pipeline.load(tiny_onnx_dir, provider="cpu")
    small.generate("a fox", steps=3, seed=5, output="np", progress=False)
    assert resident_kb(small) > 0  # a few MB: kept, not worth a smaps walk per component
    del small  # its sessions map the same files; gone, their pages don't count below
    monkeypatch.setattr(sessions, "RELEASE_MIN_BYTES", 0)
    pipe = Pipeline.load(tiny_onnx_dir, provider="cpu")
    first = pipe.generate("a fox", steps=3, seed=5, output="np", progress=False)
    assert resident_kb(pipe) == 0
    assert np.array_equal(pipe.generate("a fox", steps=3, seed=5, output="np", progress=False), first)


def test_sessions_leave_no_threads_spinning_after_a_call(tiny_onnx_dir, monkeypatch):
    """After a generate call the process is idle: no session's intra-op workers keep spinning
    (onnxruntime's default spins them ~30 ms after each run, which on few cores competed with the
    next graph's threads). Two threads per pool, whatever this machine has."""
    from sdport.runtime import options

    monkeypatch.setattr(options, "physical_cores", lambda: 2)
    pipe = Pipeline.load(tiny_onnx_dir, provider="cpu")
    for _ in range(2):
        pipe.generate("a fox", steps=2, seed=5, output="np", progress=False)
        before = time.process_time()  # CPU time of all the process's threads
        time.sleep(0.3)
        assert time.process_time() - before < 0.02  # ~0.1 ms measured; spinning workers: 50-90 ms


def _scale_graph(path: Path, factor: float) -> None:
    """y = x * factor, the factor a 4 kB inline initializer (the same file size for every factor;
    large enough that the cache stores it as external data)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024])],
        [numpy_helper.from_array(np.full(1024, factor, np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("identity", ["bytes", "stat"])
def test_session_cache_follows_changes_to_the_graph_file(tmp_path, monkeypatch, identity):
    """The pre-optimized cache never serves an old version of a graph: a rewritten file (same size,
    other weights) gets a new entry, and the old entry of that file is removed. Small graph files
    are identified by their bytes, large ones (weights inline) by size, times and inode."""
    pytest.importorskip("onnx")
    import os

    from sdport.runtime import checksums, sessions

    cache = tmp_path / "cache"
    monkeypatch.setenv("SDPORT_ORT_CACHE", str(cache))
    if identity == "stat":
        monkeypatch.setattr(checksums, "CACHE_MIN_BYTES", 0)
    path = tmp_path / "model.onnx"
    x = np.arange(1024, dtype=np.float32)
    entries = []
    for version, factor in enumerate((2.0, 3.0, 2.0), start=1):
        _scale_graph(path, factor)
        os.utime(path, ns=(version * 10**9, version * 10**9))  # distinct mtimes, as real edits
        graph = sessions.Graph("unet", path, "cpu", fused=True)
        assert np.array_equal(graph.run({"x": x})["y"], x * factor)
        (entry,) = [p.name for p in cache.iterdir()]  # the previous version's entry is gone
        entries.append(entry)
        (weights,) = graph.weight_files  # loaded from the entry: its weights live there
        assert Path(weights).parent.name == entry
    assert entries[0] != entries[1]
    if identity == "bytes":  # the same bytes again: the same entry (by stat: a new one, ctime moved)
        assert entries[2] == entries[0]


def test_session_cache_drops_the_entries_of_graphs_that_are_gone(tmp_path, monkeypatch):
    """Each entry is a full copy of its graph's weights: when one is written, those whose graph file
    no longer exists (a deleted folder) go, and those of graphs still there stay."""
    pytest.importorskip("onnx")
    from sdport.runtime import graph_cache, sessions

    cache = tmp_path / "cache"
    monkeypatch.setenv("SDPORT_ORT_CACHE", str(cache))
    kept, deleted, new = (tmp_path / name / "model.onnx" for name in ("kept", "deleted", "new"))
    for path, factor in ((kept, 2.0), (deleted, 3.0), (new, 4.0)):
        path.parent.mkdir()
        _scale_graph(path, factor)
    keys = {path: graph_cache.graph_cache_key(path, True) for path in (kept, deleted, new)}
    for path in (kept, deleted):
        sessions.Graph("unet", path, "cpu", fused=True)
    assert sorted(p.name for p in cache.iterdir()) == sorted([keys[kept], keys[deleted]])
    deleted.unlink()
    sessions.Graph("unet", new, "cpu", fused=True)
    assert sorted(p.name for p in cache.iterdir()) == sorted([keys[kept], keys[new]])
    x = np.arange(1024, dtype=np.float32)
    assert np.array_equal(sessions.Graph("unet", kept, "cpu", fused=True).run({"x": x})["y"], 2 * x)


def test_session_cache_keeps_an_entry_per_provider(tmp_path, monkeypatch):
    """One graph run on the CPU and on CUDA has a pre-optimized entry for each (each provider saves
    its own fusions; the key names the provider and its hardware), and writing one leaves the other."""
    pytest.importorskip("onnx")
    from sdport.runtime import graph_cache, sessions

    cache = tmp_path / "cache"
    monkeypatch.setenv("SDPORT_ORT_CACHE", str(cache))
    path = tmp_path / "model.onnx"
    _scale_graph(path, 2.0)
    cpu_key, cuda_key = (graph_cache.graph_cache_key(path, True, provider) for provider in ("cpu", "cuda"))
    assert cpu_key != cuda_key
    sessions.Graph("unet", path, "cpu", fused=True)
    # The CUDA entry as CUDA writes it, its graph optimized by the CPU's kernels (no GPU here).
    graph_cache.preoptimize(path, cache / cuda_key, "cuda", True, ["CPUExecutionProvider"])
    assert sorted(p.name for p in cache.iterdir()) == sorted([cpu_key, cuda_key])
    graph = sessions.Graph("unet", path, "cpu", fused=True)
    (weights,) = graph.weight_files
    assert Path(weights).parent.name == cpu_key
    x = np.arange(1024, dtype=np.float32)
    assert np.array_equal(graph.run({"x": x})["y"], 2 * x)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from Linux's /proc")
def test_writing_a_cache_entry_leaves_no_heap_behind(tmp_path, monkeypatch):
    """Writing a pre-optimized entry parses the whole graph, weights included; that memory goes
    back to the OS once the entry is written (the session then maps the weights from the entry)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from sdport.runtime.sessions import Graph

    monkeypatch.setenv("SDPORT_ORT_CACHE", str(tmp_path / "cache"))
    # 128 MB of weights inline, in 1 MB tensors (as a text encoder's: allocations that glibc's
    # heap serves and keeps, unlike single huge ones it maps and unmaps).
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(1 << 18).astype(np.float32), f"w{i}") for i in range(128)]
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(128)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1 << 18])],
        [helper.make_tensor_value_info("h128", TensorProto.FLOAT, [1 << 18])], weights,
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    del weights, graph
    before = _resident_mb()
    Graph("unet", path, "cpu", fused=True)
    assert _resident_mb() - before < 32


def test_cpu_sessions_keep_residual_add_and_layer_norm_apart(tiny_onnx_dir, tmp_path, monkeypatch):
    """onnxruntime's CPU SkipLayerNormalization ran 5-6x slower than the Add, Add and
    LayerNormalization it fuses: an fp32 (CPU) export leaves them apart, and the CPU session's
    own optimizers don't fuse them back (GPU folders keep the fusion: test_export)."""
    onnx = pytest.importorskip("onnx")
    from sdport.models.manifest import read_manifest
    from sdport.runtime import sessions

    def ops(path: Path) -> set[str]:
        return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}

    spec = read_manifest(tiny_onnx_dir).graphs["unet"]
    path = check_graph_files(tiny_onnx_dir, spec.file)
    assert "LayerNormalization" in ops(path) and "SkipLayerNormalization" not in ops(path)
    monkeypatch.setenv("SDPORT_ORT_CACHE", str(tmp_path / "cache"))
    _, optimized = sessions.open_session(path, "cpu", True, ["CPUExecutionProvider"])
    assert optimized != path  # the pre-optimized cache's graph: what onnxruntime made of the file
    assert "LayerNormalization" in ops(optimized) and "SkipLayerNormalization" not in ops(optimized)


def test_pipelines_load_in_threads_and_leave_stdout_alone(tiny_onnx_dir, capfd):
    """Opening a session hides onnxruntime's provider-fallback prints by redirecting sys.stdout,
    which is process-wide: two loads in threads once left it redirected for good, and everything
    printed after was lost. Loads in threads now leave sys.stdout as it was, and print after them."""
    from concurrent.futures import ThreadPoolExecutor

    stdout = sys.stdout
    with ThreadPoolExecutor(4) as pool:
        pipes = list(pool.map(lambda _: Pipeline.load(tiny_onnx_dir, provider="cpu"), range(8)))
    assert sys.stdout is stdout
    print("still on stdout")
    assert "still on stdout" in capfd.readouterr().out
    images = [pipe.generate("a fox", steps=2, seed=5, output="np", progress=False) for pipe in pipes[:2]]
    np.testing.assert_array_equal(images[0], images[1])
