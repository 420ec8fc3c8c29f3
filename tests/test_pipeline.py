"""End to end: sdport's Pipeline against diffusers' pipelines on the tiny model, same inputs.

Same prompt, negative prompt, guidance, steps, starting latents (and, for stochastic schedulers
and image-to-image, the same noise, replayed on both sides) through diffusers (torch) and through
`Pipeline.generate(output="np")`. Pixels in [0, 1]; tolerance atol 1e-3 (observed max errors
are printed with `pytest -s`; about 1e-6 on this model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from sdport.errors import UsageError  # noqa: E402
from sdport.models.manifest import ManifestError  # noqa: E402
from sdport.runtime import Pipeline, linear_loop, schedulers  # noqa: E402

ATOL = 1e-3  # on pixels in [0, 1]
PROMPT, NEGATIVE = "a red fox in the snow, photograph", "blurry, low quality"
STEPS = 6

# sdport name -> (diffusers class, from_config overrides)
SCHEDULERS = {
    "pndm": ("PNDMScheduler", {}),  # the folder's default
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}
# Modules whose `randn_tensor` draws the scheduler's own noise.
STOCHASTIC = {
    "euler_ancestral": "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    "dpm2_ancestral": "diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete",
}


class Replay:
    """The same noise arrays, in order, for sdport (as an rng) and for diffusers (as randn_tensor)."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = list(arrays)

    def standard_normal(self, size, dtype=np.float64):
        array = self.arrays.pop(0)
        assert array.shape == tuple(size), (array.shape, size)
        return array.astype(dtype)

    def randn_tensor(self, shape, generator=None, device=None, dtype=None, layout=None):
        array = self.arrays.pop(0)
        assert array.shape == tuple(shape), (array.shape, shape)
        return torch.from_numpy(array.copy()).to(dtype=dtype or torch.float32)


def noise(shape: tuple[int, ...], seed: int, count: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(count)]


@pytest.fixture(scope="module")
def reference(tiny_diffusers_dir: Path):
    """diffusers' text-to-image pipeline on the tiny model, and its original scheduler config."""
    from diffusers import StableDiffusionPipeline

    # One thread: the tiny model gains nothing from more, and two torch threads on a loaded
    # 2-core machine spin-wait for seconds per call (measured: 13 s vs 0.1 s per pipeline run).
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusers_dir, safety_checker=None, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


@pytest.fixture(scope="module")
def pipe(tiny_onnx_dir: Path) -> Pipeline:
    return Pipeline.load(tiny_onnx_dir, provider="cpu")


def use_scheduler(reference_pipe, config: dict, name: str) -> None:
    class_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    reference_pipe.scheduler = cls.from_config(config, **overrides)


def compare(ours: np.ndarray, theirs: np.ndarray, label: str) -> float:
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    error = float(np.abs(ours - theirs).max())
    print(f"\n{label}: max |sdport - diffusers| = {error:.2e}")
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
    return error


def run_both(pipe, reference, monkeypatch, name, *, batch=1, guidance=7.5, width=64, height=64, steps=STEPS):
    reference_pipe, config = reference
    use_scheduler(reference_pipe, config, name)
    latents = noise((batch, 4, height // 8, width // 8), seed=1)[0]
    rng = None
    if name in STOCHASTIC:
        draws = noise(latents.shape, seed=2, count=2 * steps)
        rng = Replay(draws)
        monkeypatch.setattr(f"{STOCHASTIC[name]}.randn_tensor", Replay(draws).randn_tensor)
    theirs = reference_pipe(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
        width=width, height=height, num_images_per_prompt=batch, latents=torch.from_numpy(latents.copy()),
        output_type="np",
    ).images
    ours = pipe.generate(
        PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance=guidance, width=width, height=height,
        scheduler=name, num_images=batch, latents=latents, rng=rng, output="np", progress=False,
    )
    return ours, theirs


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_text_to_image_matches_diffusers(pipe, reference, monkeypatch, name):
    if name == "lms":
        pytest.importorskip("scipy", reason="diffusers' LMSDiscreteScheduler needs scipy")
    ours, theirs = run_both(pipe, reference, monkeypatch, name)
    compare(ours, theirs, f"txt2img {name}")


def test_linear_runs_are_compiled_and_the_rest_take_the_step_functions(pipe, reference, monkeypatch):
    """The loop runs as linear_loop's products where the run is linear (the guidance_rescale test
    below holds the step functions' path to diffusers); UniPC past 6 steps keeps its corrected
    sample as a tensor of its own, and matches diffusers too."""
    paths = []
    compiled, stepped = linear_loop.Loop.run, schedulers.denoise
    monkeypatch.setattr(linear_loop.Loop, "run", lambda *a, **k: paths.append("compiled") or compiled(*a, **k))
    monkeypatch.setattr(schedulers, "denoise", lambda *a, **k: paths.append("steps") or stepped(*a, **k))
    pipe.generate(PROMPT, steps=STEPS, scheduler="euler_ancestral", seed=1, output="np", progress=False)
    pipe.generate(PROMPT, steps=STEPS, guidance_rescale=0.5, seed=1, output="np", progress=False)
    assert paths == ["compiled", "steps"]
    paths.clear()
    ours, theirs = run_both(pipe, reference, monkeypatch, "unipc", steps=12)
    assert paths == ["compiled"]
    assert any(step.derived for step in linear_loop.compile_plan("unipc", pipe.scheduler_config, 12, 0, 7.5).steps)
    compare(ours, theirs, "txt2img unipc, 12 steps (its corrected sample kept)")


def test_batch_of_two_and_non_square(pipe, reference, monkeypatch):
    ours, theirs = run_both(pipe, reference, monkeypatch, "euler_ancestral", batch=2, width=96, height=64)
    assert ours.shape == (2, 64, 96, 3)
    compare(ours, theirs, "txt2img batch 2, 96x64, euler_ancestral")


def test_guidance_one_skips_the_unconditional_branch(pipe, reference, monkeypatch, session_runs):
    ours, theirs = run_both(pipe, reference, monkeypatch, "ddim", guidance=1.0)
    batches = {feeds["sample"].shape[0] for _, feeds, _ in session_runs.of("unet")}
    assert batches == {1}, "guidance 1 must run the UNet on the positive prompt only"
    compare(ours, theirs, "txt2img guidance 1.0 ddim")


@pytest.mark.parametrize("negatives", [[NEGATIVE, "dark, grainy"], NEGATIVE])
def test_prompt_list_matches_diffusers(pipe, reference, negatives):
    """A list of prompts with num_images each: diffusers' prompt list and num_images_per_prompt,
    a negative prompt per prompt or one for all; image i of the call is image 0 of seed + i."""
    reference_pipe, config = reference
    use_scheduler(reference_pipe, config, "ddim")
    prompts = [PROMPT, "a blue bird on a branch"]
    latents = noise((4, 4, 8, 8), seed=5)[0]
    # diffusers takes a negative prompt per prompt only (a string for a list is its TypeError)
    each = negatives if isinstance(negatives, list) else [negatives] * len(prompts)
    theirs = reference_pipe(
        prompts, negative_prompt=each, num_inference_steps=STEPS, guidance_scale=7.5, width=64, height=64,
        num_images_per_prompt=2, latents=torch.from_numpy(latents.copy()), output_type="np",
    ).images
    ours = pipe.generate(
        prompts, negative_prompt=negatives, steps=STEPS, scheduler="ddim", num_images=2, latents=latents,
        output="np", progress=False,
    )
    assert ours.shape == (4, 64, 64, 3)
    compare(ours, theirs, "txt2img 2 prompts x 2 images, ddim")
    assert np.abs(ours[1] - ours[2]).max() > 0.01  # the prompts differ, not only the noise

    seeded = pipe.generate(prompts, negative_prompt=negatives, steps=2, seed=4, num_images=2, output="np", progress=False)
    alone = pipe.generate(prompts[1], negative_prompt=each[1], steps=2, seed=7, output="np", progress=False)
    np.testing.assert_allclose(seeded[3], alone[0], atol=1e-5)  # batch vs single kernels: rounding only


@pytest.mark.parametrize(
    ("prompt", "negative", "message"),
    [
        ([], "", "prompt is an empty list"),
        (["a", 5], "", "prompt 1 must be a string, got int"),
        (["a", "b"], ["x"], "negative_prompt is a list of 1 for 2 prompt(s)"),
        ("a", ["x", "y"], "negative_prompt is a list of 2 for 1 prompt(s)"),
        (["a"] * 33, "", "33 prompts x num_images 2 is too many for one batch: at most 64 images"),
    ],
)
def test_prompt_list_refusals(pipe, prompt, negative, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        pipe.generate(prompt, negative_prompt=negative, num_images=2, steps=2, progress=False)


def test_truncation_warning_names_the_prompt_as_the_caller_gave_it(pipe, caplog):
    long = "word " * 80
    with caplog.at_level(logging.WARNING, logger="sdport.runtime.tokenizer"):
        pipe.generate(long, negative_prompt=long, steps=1, progress=False)
        pipe.generate(["short", long], steps=1, progress=False)
    named = [record.getMessage().split(" is ")[0] for record in caplog.records]
    assert named == ["negative prompt", "prompt", "prompt 1"]


# Seeded like diffusers (noise="torch"): schedulers that draw noise every step, and two that don't.
SEEDED = {
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "ddpm": ("DDPMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),  # draws a noise it does not use, every step
}


@pytest.mark.parametrize("name", list(SEEDED))
def test_torch_noise_gives_diffusers_image_for_the_same_seed(pipe, reference, name):
    """No noise handed over: diffusers with `generator=torch.Generator().manual_seed(seed)`, sdport
    with seed and noise="torch" (its own NumPy twin of torch's CPU generator)."""
    reference_pipe, config = reference
    class_name, overrides = SEEDED[name]
    reference_pipe.scheduler = getattr(diffusers, class_name).from_config(config, **overrides)
    theirs = reference_pipe(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, width=64, height=64,
        generator=torch.Generator().manual_seed(31), output_type="np",
    ).images
    ours = pipe.generate(
        PROMPT, negative_prompt=NEGATIVE, steps=STEPS, scheduler=name, seed=31, noise="torch", output="np",
        progress=False,
    )
    compare(ours, theirs, f"txt2img {name}, torch noise, seed 31")
    portable = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, scheduler=name, seed=31, output="np",
                             progress=False)
    assert np.abs(portable - theirs).max() > 0.1  # the default noise is another


def test_torch_noise_batch_and_image_to_image_match_diffusers_generator_lists(pipe, tiny_diffusers_dir, reference):
    """Image i of a batch is diffusers' with generator i = torch.Generator().manual_seed(seed + i)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    reference_pipe, config = reference
    reference_pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(config)
    seeds = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    theirs = reference_pipe(
        [PROMPT, "a blue bird"], num_inference_steps=STEPS, width=96, height=64, generator=seeds, output_type="np",
    ).images
    ours = pipe.generate([PROMPT, "a blue bird"], steps=STEPS, width=96, height=64, scheduler="euler_ancestral",
                         seed=5, noise="torch", output="np", progress=False)
    compare(ours, theirs, "txt2img 2 prompts, euler_ancestral, torch noise, seeds 5 and 6")

    image_to_image = StableDiffusionImg2ImgPipeline(**reference_pipe.components)
    image_to_image.set_progress_bar_config(disable=True)
    image = gradient_image(64, 48)
    seeds = [torch.Generator().manual_seed(8 + i) for i in range(2)]
    theirs = image_to_image(PROMPT, image=image, strength=0.6, num_inference_steps=STEPS, num_images_per_prompt=2,
                            generator=seeds, output_type="np").images
    ours = pipe.generate(PROMPT, image=image, strength=0.6, steps=STEPS, num_images=2, scheduler="euler_ancestral",
                         seed=8, noise="torch", output="np", progress=False)
    compare(ours, theirs, "img2img 2 images, euler_ancestral, torch noise, seeds 8 and 9")


def test_eta_and_guidance_rescale_match_diffusers(pipe, reference):
    """DDIM's eta (noise drawn every step) and guidance_rescale, seeded like diffusers."""
    reference_pipe, config = reference
    for name, class_name, settings in [
        ("ddim", "DDIMScheduler", {"eta": 0.6}),
        ("euler", "EulerDiscreteScheduler", {"guidance_rescale": 0.7}),
    ]:
        reference_pipe.scheduler = getattr(diffusers, class_name).from_config(config)
        theirs = reference_pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, output_type="np",
                                generator=torch.Generator().manual_seed(3), **settings).images
        ours = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, scheduler=name, seed=3, noise="torch",
                             output="np", progress=False, **settings)
        compare(ours, theirs, f"txt2img {name} {settings}")
        plain = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, scheduler=name, seed=3, noise="torch",
                              output="np", progress=False)
        assert np.abs(plain - theirs).max() > 2 * ATOL  # the setting is what made them equal


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"eta": 0.5, "scheduler": "euler"}, "eta applies to the ddim scheduler only, not to 'euler'"),
        ({"eta": -0.1, "scheduler": "ddim"}, "eta must be 0 or more, got -0.1"),
        ({"guidance_rescale": 1.5}, "guidance_rescale must be in [0, 1], got 1.5"),
        ({"guidance_rescale": float("nan")}, "guidance_rescale must be a finite number, got nan"),
    ],
)
def test_eta_and_guidance_rescale_refusals(pipe, settings, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        pipe.generate(PROMPT, steps=2, progress=False, **settings)


def test_clip_skip_matches_diffusers(pipe, reference):
    """diffusers' clip_skip, whose own code (text_encoder.text_model) fails with transformers 5: its
    embeddings made as that code makes them, then given to diffusers as prompt_embeds."""
    reference_pipe, config = reference
    use_scheduler(reference_pipe, config, "ddim")

    def embeddings(text: str, clip_skip: int):
        ids = reference_pipe.tokenizer([text], padding="max_length", truncation=True, return_tensors="pt",
                                       max_length=reference_pipe.tokenizer.model_max_length).input_ids
        with torch.no_grad():
            out = reference_pipe.text_encoder(ids, output_hidden_states=True)
            if not clip_skip:
                return out[0]
            return reference_pipe.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])

    latents = noise((1, 4, 8, 8), seed=6)[0]
    theirs = reference_pipe(
        prompt_embeds=embeddings(PROMPT, 1), negative_prompt_embeds=embeddings(NEGATIVE, 0),  # as diffusers
        num_inference_steps=STEPS, latents=torch.from_numpy(latents.copy()), output_type="np",
    ).images
    kwargs = dict(negative_prompt=NEGATIVE, steps=STEPS, scheduler="ddim", latents=latents, output="np", progress=False)
    compare(pipe.generate(PROMPT, clip_skip=1, **kwargs), theirs, "txt2img clip_skip 1, ddim")
    assert np.abs(pipe.generate(PROMPT, **kwargs) - theirs).max() > 0.05


def test_clip_skip_refusals(pipe, monkeypatch):
    for clip_skip, message in [(2, "clip_skip 2 is too many: this text encoder has 2 layers, so at most 1"),
                               (-1, "clip_skip must be 0 (off) or a positive integer, got -1")]:
        with pytest.raises(UsageError, match=re.escape(message)):
            pipe.generate(PROMPT, steps=1, clip_skip=clip_skip, progress=False)
    # a folder exported before the output existed
    text_encoder = pipe.manifest.graphs["text_encoder"]
    older = dataclasses.replace(text_encoder, outputs=text_encoder.outputs[:2])
    monkeypatch.setattr(pipe, "manifest", dataclasses.replace(pipe.manifest, graphs={**pipe.manifest.graphs, "text_encoder": older}))
    with pytest.raises(UsageError, match="text encoder gives only its last layer's hidden states; re-export"):
        pipe.generate(PROMPT, steps=1, clip_skip=1, progress=False)


def test_unknown_noise_is_refused(pipe):
    with pytest.raises(UsageError, match="noise must be one of portable, torch, got 'numpy'"):
        pipe.generate(PROMPT, steps=1, noise="numpy", progress=False)


def gradient_image(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


@pytest.mark.parametrize(("name", "strength"), [("pndm", 0.5), ("euler_ancestral", 0.75), ("dpmpp_2m", 0.3)])
def test_image_to_image_matches_diffusers(pipe, tiny_diffusers_dir, monkeypatch, name, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    torch.set_num_threads(1)  # see `reference`
    reference_pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_diffusers_dir, safety_checker=None, torch_dtype=torch.float32
    )
    reference_pipe.set_progress_bar_config(disable=True)
    use_scheduler(reference_pipe, dict(reference_pipe.scheduler.config), name)
    image = gradient_image(64, 48)
    shape = (1, 4, 6, 8)
    image_noise, start_noise = noise(shape, seed=3, count=2)
    monkeypatch.setattr("diffusers.models.autoencoders.vae.randn_tensor", Replay([image_noise]).randn_tensor)
    monkeypatch.setattr(
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img.randn_tensor",
        Replay([start_noise]).randn_tensor,
    )
    rng = None
    if name in STOCHASTIC:
        draws = noise(shape, seed=4, count=2 * STEPS)
        rng = Replay(draws)
        monkeypatch.setattr(f"{STOCHASTIC[name]}.randn_tensor", Replay(draws).randn_tensor)
    theirs = reference_pipe(
        PROMPT, image=image, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
        guidance_scale=7.5, output_type="np",
    ).images
    ours = pipe.generate(
        PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance=7.5, scheduler=name, image=image,
        strength=strength, latents=start_noise, image_noise=image_noise, rng=rng, output="np", progress=False,
    )
    compare(ours, theirs, f"img2img {name} strength {strength}")


def test_seeds_reproduce_image_by_image(pipe):
    kwargs = dict(steps=3, scheduler="euler_ancestral", output="np", progress=False)
    batch = pipe.generate(PROMPT, seed=7, num_images=2, **kwargs)
    again = pipe.generate(PROMPT, seed=7, num_images=2, **kwargs)
    alone = pipe.generate(PROMPT, seed=8, num_images=1, **kwargs)
    np.testing.assert_array_equal(batch, again)
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)  # batch vs single kernels: rounding only
    assert np.abs(batch[0] - batch[1]).max() > 0.01


@pytest.mark.parametrize("scheduler, steps, image", [("euler", 4, False), ("heun", 3, False), ("pndm", 4, True)])
def test_working_memory_is_released_after_the_last_run_of_each_graph(pipe, session_runs, scheduler, steps, image):
    """The text encoder's run and the final UNet evaluation (heun: 2N - 1 of them; image-to-image:
    only the remaining ones) are marked `last`, so the arena is freed before the VAE runs."""
    totals = []
    source = Image.new("RGB", (64, 64), (120, 80, 40)) if image else None
    pipe.generate(PROMPT, steps=steps, scheduler=scheduler, image=source, strength=0.5, progress=False,
                  callback=lambda i, total, x: totals.append(total))
    unet = [last for _, _, last in session_runs.of("unet")]
    assert len(unet) == totals[0] == len(totals)
    assert unet == [False] * (len(unet) - 1) + [True]
    assert [last for _, _, last in session_runs.of("text_encoder")] == [True]


def test_vae_encoder_session_is_made_at_the_first_image_to_image_call(tiny_onnx_dir, tmp_path):
    """Text-to-image never opens the VAE encoder (on a GPU its session holds weights and a workspace);
    image-to-image opens it once and keeps it, except with low_memory; its I/O is still checked at load."""
    source = Image.new("RGB", (64, 64), (120, 80, 40))
    pipe = Pipeline.load(tiny_onnx_dir, provider="cpu")
    assert set(pipe._graphs) == {"text_encoder", "unet", "vae_decoder"}
    pipe.generate(PROMPT, steps=2, progress=False)
    assert "vae_encoder" not in pipe._graphs
    first = pipe.generate(PROMPT, steps=2, image=source, strength=0.5, output="np", progress=False)
    encoder = pipe._graphs["vae_encoder"]
    again = pipe.generate(PROMPT, steps=2, image=source, strength=0.5, output="np", progress=False)
    assert pipe._graphs["vae_encoder"] is encoder
    np.testing.assert_array_equal(first, again)
    low = Pipeline.load(tiny_onnx_dir, provider="cpu", low_memory=True)
    np.testing.assert_array_equal(low.generate(PROMPT, steps=2, image=source, strength=0.5, output="np",
                                               progress=False), first)
    assert low._graphs == {}

    folder = tmp_path / "model"
    shutil.copytree(tiny_onnx_dir, folder)
    data = json.loads((folder / "sdport.json").read_text())
    data["graphs"]["vae_encoder"]["outputs"][0]["shape"][1] = 6  # the graph has 2 x 4 latent channels
    (folder / "sdport.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="vae_encoder: output 'latent_parameters'"):
        Pipeline.load(folder, provider="cpu")


def test_default_size_and_scheduler_come_from_the_folder(pipe):
    assert pipe.default_scheduler == "pndm"
    images = pipe.generate("a fox", steps=2, progress=False)
    assert [im.size for im in images] == [(64, 64)]  # sample_size 8 * vae_scale 8


def optimum_folder(tiny_onnx_dir: Path, tiny_diffusers_dir: Path, out: Path) -> Path:
    """The tiny export laid out as optimum writes it: no sdport.json, no tokenizer.json, and a
    UNet whose timestep input is int64 of shape [1] (as older optimum/diffusers ONNX exports)."""
    from diffusers import UNet2DConditionModel

    shutil.copytree(tiny_onnx_dir, out)
    (out / "sdport.json").unlink()
    (out / "tokenizer" / "tokenizer.json").unlink()

    class UNetInt64(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    unet = UNet2DConditionModel.from_pretrained(tiny_diffusers_dir / "unet").eval()
    example = (torch.randn(2, 4, 8, 8), torch.tensor([981], dtype=torch.int64), torch.randn(2, 77, 32))
    (out / "unet" / "model.onnx").unlink()
    with torch.no_grad():
        torch.onnx.export(
            UNetInt64(unet), example, str(out / "unet" / "model.onnx"), dynamo=False, opset_version=17,
            input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["out_sample"],
            dynamic_axes={
                "sample": {0: "batch_size", 2: "height", 3: "width"},
                "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
                "out_sample": {0: "batch_size", 2: "height", 3: "width"},
            },
        )
    return out


def test_optimum_layout_with_int64_timestep(tiny_onnx_dir, tiny_diffusers_dir, reference, monkeypatch, tmp_path):
    import onnxruntime as ort

    folder = optimum_folder(tiny_onnx_dir, tiny_diffusers_dir, tmp_path / "optimum")
    timestep = ort.InferenceSession(str(folder / "unet" / "model.onnx")).get_inputs()[1]
    assert (timestep.type, timestep.shape) == ("tensor(int64)", [1])
    optimum = Pipeline.load(folder, provider="cpu", low_memory=True)
    assert optimum.manifest.source.startswith("optimum-style")
    ours, theirs = run_both(optimum, reference, monkeypatch, "pndm")
    compare(ours, theirs, "optimum layout, int64 [1] timestep, low_memory, pndm")


def test_progress_bar_counts_evaluations_and_is_not_made_without_progress(tiny_onnx_dir, monkeypatch, capsys):
    """progress=True shows a bar over the model evaluations; progress=False makes no bar at all
    (even a disabled tqdm costs more than a tiny model's 1%-of-a-step overhead budget)."""
    import sdport.runtime.pipeline as pipeline_module

    made = []
    real_tqdm = pipeline_module.tqdm
    monkeypatch.setattr(pipeline_module, "tqdm", lambda *args, **kwargs: made.append(kwargs) or real_tqdm(*args, **kwargs))
    pipe = Pipeline.load(tiny_onnx_dir, provider="cpu")
    pipe.generate(PROMPT, steps=3, scheduler="pndm", progress=False)
    assert made == [] and capsys.readouterr().err == ""
    pipe.generate(PROMPT, steps=3, scheduler="pndm", progress=True)
    assert [kwargs["total"] for kwargs in made] == [4]  # pndm: N + 1 evaluations
    assert "4/4" in capsys.readouterr().err
