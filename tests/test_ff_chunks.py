"""Transformer feed-forwards in chunks of rows: the same numbers through both branches of the If,
undone exactly, kept by int8 quantization, and made only where they pay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_export import CASES, TOLERANCE, cli_export_keywords, run_profiled, torch_outputs

from sdport.export import ff_chunks
from sdport.export.folder import export_model
from sdport.export.quantize import quantize_model


@pytest.fixture(scope="module")
def reference(tiny_diffusers_dir: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_diffusers_dir, safety_checker=None)


def _rewrite_all(src: Path, dst: Path, min_rows: int) -> int:
    """`src` with every row-wise block rewritten (no native-size rule), saved at `dst`."""
    model = onnx.load(str(src))
    count = len(ff_chunks.rewrite_blocks(model, ff_chunks.find_blocks(model), min_rows))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return count


def _run(path: Path, inputs: dict[str, np.ndarray], tmp_path: Path) -> tuple[np.ndarray, set[str]]:
    """The graph's output for `inputs`, and which branches of the chunk Ifs ran."""
    got, names = run_profiled(path, inputs, tmp_path)
    return got, {suffix for suffix in (ff_chunks.CHUNK, ff_chunks.WHOLE) if any(suffix in n for n in names)}


@pytest.mark.parametrize("min_rows, branch", [(1, ff_chunks.CHUNK), (1 << 40, ff_chunks.WHOLE)])
def test_both_branches_give_the_numbers_of_the_graph_without_them(min_rows, branch, tiny_onnx_dir, reference,
                                                                   tmp_path):
    # Latents 6x10 hold 60 tokens at the first level: 7 chunks of 7 and a last one of 11.
    plain = tiny_onnx_dir / "unet" / "model.onnx"
    path = tmp_path / "chunked" / "model.onnx"
    assert _rewrite_all(plain, path, min_rows) > 0
    unchanged = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for batch, h, w in [*CASES, (2, 8, 8)]:
        inputs, (want,) = torch_outputs(reference, "unet", batch, h, w, rng)
        got, ran = _run(path, inputs, tmp_path)
        assert ran == {branch}
        np.testing.assert_allclose(got, unchanged.run(None, inputs)[0], rtol=0, atol=1e-6 * np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE * np.abs(want).max())


def test_fewer_tokens_than_chunks_take_the_whole_branch(tiny_onnx_dir, reference, tmp_path):
    path = tmp_path / "chunked" / "model.onnx"
    _rewrite_all(tiny_onnx_dir / "unet" / "model.onnx", path, min_rows=1)
    inputs, (want,) = torch_outputs(reference, "unet", 2, 2, 2, np.random.default_rng(4))  # 4 tokens, then 1
    got, ran = _run(path, inputs, tmp_path)
    assert ran == {ff_chunks.WHOLE}
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE * np.abs(want).max())


def test_restore_gives_back_the_graph(tiny_onnx_dir):
    plain = onnx.load(str(tiny_onnx_dir / "unet" / "model.onnx"))
    model = onnx.ModelProto()
    model.CopyFrom(plain)
    prefixes = ff_chunks.rewrite_blocks(model, ff_chunks.find_blocks(model), 1)
    assert prefixes and all(p.endswith("/transformer_blocks.0/") for p in prefixes)
    assert set(ff_chunks.restore_chunks(model)) == set(prefixes)

    def nodes(m):
        return sorted((n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in m.graph.node)

    assert nodes(model) == nodes(plain)
    assert not any(p.key == ff_chunks.CHUNKS_KEY for p in model.metadata_props)
    assert ff_chunks.restore_chunks(plain) == {}


def test_only_blocks_large_at_the_native_size_are_chosen(tiny_onnx_dir, monkeypatch):
    model = onnx.load(str(tiny_onnx_dir / "unet" / "model.onnx"), load_external_data=False)
    blocks = ff_chunks.find_blocks(model)
    # The tiny model's blocks are row-wise, but its export left them whole: they are too narrow.
    assert blocks and ff_chunks.chunk_records(model) == {}

    def chosen(batch: int, tokens: int) -> int:
        return len(ff_chunks.eligible_blocks(model, {block.input: [batch, tokens, 32] for block in blocks}))

    width = min(block.width for block in blocks)
    assert chosen(2, 4096) == 0  # 8192 rows of `width`: under MIN_BYTES
    monkeypatch.setattr(ff_chunks, "MIN_BYTES", 8192 * width * 4)
    assert chosen(2, 4096) == len(blocks)
    assert chosen(2, 512) == 0  # under MIN_ROWS
    assert len(ff_chunks.eligible_blocks(model, {})) == 0  # shapes unknown


def test_export_checks_the_chunks_against_pytorch_and_int8_keeps_them(tiny_diffusers_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ff_chunks, "MIN_BYTES", 0)
    monkeypatch.setattr(ff_chunks, "MIN_ROWS", 1)  # the tiny model's blocks through the chunks
    out = export_model(tiny_diffusers_dir, tmp_path / "onnx", report=None)
    manifest = json.loads((out / "sdport.json").read_text())
    assert manifest["graphs"]["unet"]["parity"]["ff_chunks"]["max_rel_error"] < TOLERANCE
    fp32_path = out / "unet" / "model.onnx"
    records = ff_chunks.chunk_records(onnx.load(str(fp32_path), load_external_data=False))
    assert records and {r["min_rows"] for r in records.values()} == {1}

    int8_path = quantize_model(out, tmp_path / "int8", report=None) / "unet" / "model.onnx"
    int8 = onnx.load(str(int8_path))
    assert ff_chunks.chunk_records(int8) == records
    outputs = {record["output"] for record in records.values()}
    ifs = [node for node in int8.graph.node if node.op_type == "If" and node.output[0] in outputs]
    chunk_ops = {inner.op_type for node in ifs for a in node.attribute if a.name == "then_branch" for inner in a.g.node}
    assert chunk_ops & {"MatMulInteger", "DynamicQuantizeMatMul"}  # quantized inside the chunks
    # Each chunk takes its own activation range: as close to fp32 as quantizing the whole tensor.
    whole = onnx.ModelProto()
    whole.CopyFrom(int8)
    ff_chunks.restore_chunks(whole)
    onnx.save(whole, str(tmp_path / "whole.onnx"))
    rng = np.random.default_rng(5)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32), "timestep": np.array(500, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    fp32, got, want = (ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                       for path in (fp32_path, int8_path, tmp_path / "whole.onnx"))
    assert 0 < np.abs(got - fp32).max() < 1.5 * np.abs(want - fp32).max()


def test_cli_no_ff_chunks_reaches_the_export(monkeypatch, tmp_path):
    calls = cli_export_keywords(monkeypatch, tmp_path, ["--no-ff-chunks"], [])
    assert [call["ff_chunks"] for call in calls] == [False, True]
