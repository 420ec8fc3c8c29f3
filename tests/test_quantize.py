"""int8 UNet folders (sdport.export.quantize): they load, generate, and their error is measured."""

from __future__ import annotations

import numpy as np

from sdport.export.quantize import quantize_model
from sdport.models.manifest import read_manifest
from sdport.runtime.pipeline import Pipeline


def test_int8_folder_loads_generates_and_reports_its_error(tiny_onnx_dir, tmp_path, record_property):
    out = quantize_model(tiny_onnx_dir, tmp_path / "int8", report=None)

    manifest = read_manifest(out)
    assert manifest.graphs["unet"].precision == "int8"
    assert {g: s.precision for g, s in manifest.graphs.items() if g != "unet"} == {
        g: s.precision for g, s in read_manifest(tiny_onnx_dir).graphs.items() if g != "unet"
    }
    unet_error = manifest.graphs["unet"].parity["int8"]["max_rel_error"]
    assert np.isfinite(unet_error) and unet_error > 0  # quantized: close, but not identical

    request = dict(prompt="a red cube", steps=4, seed=3, output="np", progress=False)
    fp32 = Pipeline.load(tiny_onnx_dir).generate(**request)
    int8 = Pipeline.load(out).generate(**request)
    assert int8.shape == fp32.shape and np.isfinite(int8).all()
    image_error = float(np.max(np.abs(int8 - fp32)))
    record_property("int8_unet_max_rel_error", unet_error)
    record_property("int8_image_max_abs_error", image_error)
    print(f"int8 vs fp32: unet output {unet_error:.2e} of range, image max {image_error:.3f} ([0, 1] pixels)")
    assert np.isfinite(image_error)


def test_int8_refuses_an_existing_out_and_a_non_fp32_unet(tiny_onnx_dir, tmp_path):
    import pytest

    from sdport.errors import SdportError

    out = quantize_model(tiny_onnx_dir, tmp_path / "int8", report=None)
    with pytest.raises(SdportError, match="already exists"):
        quantize_model(tiny_onnx_dir, out, report=None)
    with pytest.raises(SdportError, match="int8 quantization starts from an fp32 export"):
        quantize_model(out, tmp_path / "again", report=None)
