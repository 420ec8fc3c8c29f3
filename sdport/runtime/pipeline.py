"""Stable Diffusion on onnxruntime + NumPy: `Pipeline.load(folder).generate(prompt=...)`.

Follows diffusers' StableDiffusionPipeline and StableDiffusionImg2ImgPipeline step by step
(text embeddings, classifier-free guidance in one batched UNet call, scheduler, VAE decode), so
the same inputs give the same images; tests/test_pipeline.py checks it against diffusers.
Never imports torch, transformers, diffusers or sdport.export.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sdport.errors import SdportError, UsageError
from sdport.models.manifest import CLIP_SKIP_OUTPUT, Manifest, ManifestError, TensorSpec, inside, read_json, read_manifest
from sdport.runtime import images as imgs
from sdport.runtime import linear_loop, schedulers
from sdport.runtime.checksums import verify_sha256
from sdport.runtime.graph_files import check_graph_files
from sdport.runtime.noise import BatchNoise, LookaheadNoise
from sdport.runtime.request_checks import DEFAULT_STRENGTH, check_request, check_size, text_labels
from sdport.runtime.sessions import Graph, Port, ProviderName, resolve_provider
from sdport.runtime.tokenizer import ClipTokenizer
from sdport.runtime.torch_noise import TorchBatchNoise

Output = Literal["pil", "np"]
NoiseKind = Literal["portable", "torch"]
NOISE_KINDS: tuple[str, ...] = ("portable", "torch")
Callback = Callable[[int, int, np.ndarray], None]  # (step, steps, latents [B, C, h, w])
Say = Callable[[str], None]


class NoiseSource(Protocol):
    """What the pipeline draws noise from: `np.random.Generator` or anything with this method."""

    def standard_normal(self, size: tuple[int, ...], dtype: Any = ...) -> np.ndarray: ...


# --- graph contracts: what each component must take and give --------------------------------


@dataclass(frozen=True)
class _Want:
    name: str
    ranks: tuple[int, ...]
    dims: dict[int, int]  # axis -> required size, checked where the graph fixes the axis
    kind: str  # "f" float or "i" integer
    what: str  # the dims in words, for messages


def _contracts(m: Manifest) -> dict[str, tuple[tuple[_Want, ...], tuple[_Want, ...]]]:
    """(inputs, outputs) each component must have, from the manifest's facts."""
    c, d, t = m.latent_channels, m.text_embed_dim, m.max_tokens
    latent = f"(B, {c}, H/{m.vae_scale}, W/{m.vae_scale})"
    pixels = "(B, 3, H, W)"
    return {
        "text_encoder": (
            (_Want("input_ids", (2,), {1: t}, "i", f"(B, {t})"),),
            (_Want("last_hidden_state", (3,), {2: d}, "f", f"(B, {t}, {d})"),),
        ),
        "unet": (
            (
                _Want("sample", (4,), {1: c}, "f", latent),
                _Want("timestep", (0, 1), {}, "fi", "a scalar or (1,)"),
                _Want("encoder_hidden_states", (3,), {2: d}, "f", f"(B, {t}, {d})"),
            ),
            (_Want("out_sample", (4,), {1: c}, "f", latent),),
        ),
        "vae_decoder": (
            (_Want("latent_sample", (4,), {1: c}, "f", latent),),
            (_Want("sample", (4,), {1: 3}, "f", pixels),),
        ),
        "vae_encoder": (
            (_Want("sample", (4,), {1: 3}, "f", pixels),),
            (_Want("latent_parameters", (4,), {1: 2 * c}, "f", f"(B, {2 * c}, H/{m.vae_scale}, W/{m.vae_scale})"),),
        ),
    }


def _check_ports(component: str, file: str, direction: str, have: tuple[Port, ...], wants: tuple[_Want, ...]) -> None:
    by_name = {p.name: p for p in have}
    for want in wants:
        port = by_name.get(want.name)
        if port is None:
            raise ManifestError(
                f"{component}: {file} has no {direction} {want.name!r} (it has "
                f"{', '.join(repr(p.name) for p in have) or 'none'}); the runtime needs the I/O names of "
                f"sdport's or optimum's export: re-export the model with `sdport export`"
            )
        where = f"{component}: {direction} {want.name!r} of {file}"
        if port.dtype is None or np.dtype(port.dtype).kind not in want.kind:
            raise ManifestError(f"{where} has an unsupported element type; re-export the model")
        if len(port.shape) not in want.ranks:
            raise ManifestError(f"{where} has shape {list(port.shape)}, the runtime wants {want.what}; re-export")
        for axis, size in want.dims.items():
            got = port.shape[axis]
            if isinstance(got, int) and got != size:
                raise ManifestError(
                    f"{where} has {got} at axis {axis}, the manifest says {size} ({want.what}); the "
                    f"graph and sdport.json disagree: re-export the model"
                )


def _spec_ports(specs: tuple[TensorSpec, ...]) -> tuple[Port, ...]:
    return tuple(Port(s.name, np.dtype(s.dtype).type, tuple(s.shape)) for s in specs)


def _tokenizer_dir(folder: Path, relative: str) -> Path:
    """The tokenizer folder, after checking that none of its files is a link out of the model folder."""
    path = inside(folder, relative)
    if path.is_dir():
        for item in path.iterdir():
            inside(folder, f"{relative}/{item.name}")
    return path


# --- randomness ------------------------------------------------------------------------------


def _rescaled(guided: np.ndarray, text: np.ndarray, factor: float) -> np.ndarray:
    """diffusers' rescale_noise_cfg: `guided` scaled to the text prediction's standard deviation
    (per image, unbiased as torch's std), mixed in by `factor`."""
    axes = tuple(range(1, guided.ndim))
    rescaled = guided * (text.std(axis=axes, ddof=1, keepdims=True) / guided.std(axis=axes, ddof=1, keepdims=True))
    return np.float32(factor) * rescaled + np.float32(1 - factor) * guided


def _draw(rng: NoiseSource, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(rng.standard_normal(shape, dtype=np.float32), dtype=np.float32)


def _given_noise(name: str, value: Any, shape: tuple[int, ...], broadcast: bool = False) -> np.ndarray:
    """A caller's noise array, checked: shape (B, C, h, w) (or (1, ...) where `broadcast`), finite."""
    array = np.asarray(value, dtype=np.float32)
    ok = array.shape == shape or (broadcast and array.shape == (1, *shape[1:]))
    if not ok:
        raise UsageError(
            f"{name} has shape {array.shape}, wants {shape} (num_images, latent channels, height/8, "
            f"width/8 for this size)"
        )
    if not np.isfinite(array).all():
        raise UsageError(f"{name} contains NaN or inf")
    return np.ascontiguousarray(np.broadcast_to(array, shape))


class Pipeline:
    """A loaded model folder: onnxruntime sessions, tokenizer and scheduler config.

    Make one with `Pipeline.load(folder)`; `generate(...)` is safe to call repeatedly.
    """

    # Opened at the first image-to-image call, not at load: text-to-image never runs it, and on a
    # GPU its session would hold its weights (fp32 in every export) and a workspace for nothing.
    ON_DEMAND = frozenset({"vae_encoder"})

    # Run as captured CUDA graphs where enabled: the UNet, the one graph run many times per call.
    CUDA_GRAPHS = frozenset({"unet"})

    # Opened on CPU without packing their matrix products' weights (Graph's prepack): the text
    # encoder runs once per call, and packing costs more at session creation than at each run. SD
    # 1.5's: its session opened in 0.01 s instead of 0.21 s (onnxruntime packs every weight again
    # to find the copy saved in the cache entry), its runs took 75 ms instead of 64 ms, and its
    # cache entry holds 0.49 GB instead of 0.83 GB (2-core Zen 5, 2026-11-29). The VAE decoder
    # gained nothing either way (its 4.2 s run, 0.1 s session), so it keeps them.
    UNPACKED = frozenset({"text_encoder"})

    def __init__(
        self, folder: Path, manifest: Manifest, provider: str, low_memory: bool, say: Say | None,
        verify: bool = True, cuda_graphs: bool = False,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.provider = provider
        self.low_memory = low_memory
        self.cuda_graphs = cuda_graphs and provider == "cuda" and not low_memory
        self._say = say
        self.size_multiple = manifest.vae_scale * manifest.latent_multiple
        self.tokenizer = ClipTokenizer.load(_tokenizer_dir(folder, manifest.tokenizer_dir), manifest.max_tokens)
        self.scheduler_config = self._read_scheduler_config()
        self.default_scheduler = self._default_scheduler()
        self.contracts = _contracts(manifest)
        self._graphs: dict[str, Graph] = {}
        missing = [n for n in ("text_encoder", "unet", "vae_decoder") if n not in manifest.graphs]
        if missing:
            raise ManifestError(
                f"{folder}: no {', '.join(missing)} graph; the folder needs text_encoder, unet and "
                f"vae_decoder (and vae_encoder for image-to-image): re-export the model"
            )
        for name in manifest.graphs:
            if name not in self.contracts:
                continue
            path = check_graph_files(folder, manifest.graphs[name].file)
            if verify:
                verify_sha256(folder, name, manifest.graphs[name].sha256)
            if low_memory or name in self.ON_DEMAND:
                # Sessions are made when needed; check what the manifest says now, the graph then.
                spec = manifest.graphs[name]
                if spec.inputs or spec.outputs:
                    self._check(name, _spec_ports(spec.inputs), _spec_ports(spec.outputs))
            else:
                self._graphs[name] = self._open(name, path)

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike,
        provider: ProviderName = "auto",
        low_memory: bool = False,
        *,
        say: Say | None = None,
        verify: bool = True,
        cuda_graphs: bool = False,
    ) -> Pipeline:
        """Loads an exported model folder (sdport's, with sdport.json, or optimum's layout).

        Args:
            model_dir: the folder `sdport export` wrote.
            provider: "auto" (CUDA, then DirectML, then CPU), "cpu", "cuda" or "dml".
            low_memory: hold one component's session at a time, created when needed and freed
                after (slower per call, lower peak memory); otherwise all are created now. With
                low_memory the graphs' inputs/outputs are checked at load against sdport.json's
                record of them, and again against each session when it is created (an optimum
                folder has no record, so only then).
            say: receives one-line notes (which provider was picked, image conversions).
            verify: check the graph files against the sha256 digests in sdport.json (files that
                verified before and are unchanged are not re-read; see sdport.runtime.checksums).
            cuda_graphs: on CUDA (and without low_memory), run the UNet as captured CUDA graphs
                (sdport.runtime.device_runs), one per image size and batch. For a process that
                generates many images: each step is faster (SD 1.5 at 512 px on an H100: a warm
                20-step image in 0.39 s instead of 0.42), but the first call of each size pays
                for the capture, and the UNet's working memory stays held between calls. Needs an
                --fp16 export: an fp32 UNet has If nodes (Winograd convolutions, its guided
                prefix), which CUDA graphs can't hold; it then runs without them, with a note.
        Raises:
            UsageError for an unknown or missing provider; ManifestError for a folder that is
            missing, incomplete, or whose graphs do not have the inputs/outputs needed.
        """
        folder = Path(model_dir)
        manifest = read_manifest(folder)
        chosen = resolve_provider(provider, say)
        return cls(folder, manifest, chosen, low_memory, say, verify, cuda_graphs)

    # --- sessions ------------------------------------------------------------------------------

    def _check(self, name: str, inputs: tuple[Port, ...], outputs: tuple[Port, ...]) -> None:
        file = self.manifest.graphs[name].file
        wants_in, wants_out = self.contracts[name]
        _check_ports(name, file, "input", inputs, wants_in)
        _check_ports(name, file, "output", outputs, wants_out)

    def _open(self, name: str, path: Path) -> Graph:
        fused = self.manifest.graphs[name].optimization == "ort"
        graph = Graph(
            name, path, self.provider, fused, cuda_graph=self.cuda_graphs and name in self.CUDA_GRAPHS,
            prepack=name not in self.UNPACKED,
        )
        self._check(name, graph.inputs, graph.outputs)
        return graph

    @contextlib.contextmanager
    def _graph(self, name: str) -> Iterator[Graph]:
        """The session of `name`: the loaded one, or (low_memory) a fresh one freed afterwards; an
        ON_DEMAND one is opened at its first use and then kept."""
        if name in self._graphs:
            yield self._graphs[name]
            return
        if name not in self.manifest.graphs:
            raise ManifestError(
                f"{self.folder}: no {name} graph; image-to-image needs the VAE encoder: re-export the model"
            )
        graph = self._open(name, check_graph_files(self.folder, self.manifest.graphs[name].file))
        if not self.low_memory:
            self._graphs[name] = graph
            yield graph
            return
        try:
            yield graph
        finally:
            graph.release_device()
            del graph
            gc.collect()

    # --- config --------------------------------------------------------------------------------

    def _read_scheduler_config(self) -> dict[str, Any]:
        path = inside(self.folder, self.manifest.scheduler_config)
        config = read_json(path)
        if not isinstance(config, dict):
            raise ManifestError(f"{path}: expected a JSON object (a diffusers scheduler config)")
        # The manifest is the source of truth for what the UNet predicts.
        return {**config, "prediction_type": self.manifest.prediction_type}

    def _default_scheduler(self) -> str | None:
        return schedulers.name_for_config(self.scheduler_config)

    def _scheduler(self, scheduler: str | None) -> tuple[str, dict[str, Any]]:
        """(scheduler name, config) for a request: the folder's config, Karras sigmas for `*_karras`."""
        if scheduler is None:
            if self.default_scheduler is None:
                raise UsageError(
                    f"the folder's scheduler {self.scheduler_config.get('_class_name')!r} is not "
                    f"implemented; pick one with scheduler=... ({', '.join(schedulers.request_names())})"
                )
            return self.default_scheduler, self.scheduler_config
        return schedulers.resolve_request(scheduler, self.scheduler_config)

    # --- generation ----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = "",
        steps: int = 25,
        guidance: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        seed: int = 0,
        scheduler: str | None = None,
        num_images: int = 1,
        latents: np.ndarray | None = None,
        image: Image.Image | str | os.PathLike | None = None,
        strength: float = DEFAULT_STRENGTH,
        output: Output = "pil",
        callback: Callback | None = None,
        *,
        image_noise: np.ndarray | None = None,
        rng: NoiseSource | None = None,
        noise: NoiseKind = "portable",
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        clip_skip: int = 0,
        progress: bool = True,
    ) -> list[Image.Image] | np.ndarray:
        """Generates `num_images` images for each prompt (text-to-image, or image-to-image with `image`).

        Args:
            prompt, negative_prompt: the texts; the negative one is the unconditional branch of
                classifier-free guidance (an empty string, as in diffusers, when not given).
                A list of prompts makes one batch of `num_images` images for each, in order
                (diffusers' prompt list and num_images_per_prompt), with one negative prompt
                for all or a list of one per prompt.
            steps: scheduler steps (image-to-image runs the last `int(steps * strength)` of them).
            guidance: classifier-free guidance scale; at 1 or below the unconditional branch is
                skipped (one UNet batch of B instead of 2B), as in diffusers.
            width, height: pixels, multiples of `self.size_multiple`; default: the model's native
                size, or with `image` its size rounded down to a multiple.
            seed: image i of the call (prompt-major: the first prompt's images first) draws all of
                its noise from its own generator seeded with seed + i (`noise`), so image i of a
                batch is reproduced alone with seed + i (AUTOMATIC1111's convention); portable
                noise also by the Node.js and browser hosts (docs/CONTRACT.md).
            scheduler: a name from `schedulers.request_names()` ("euler", "dpmpp_2m", ..., and
                "dpmpp_2m_karras" etc. for Karras sigmas); default: the folder's scheduler.
            num_images: images per prompt; all of a call's images are one batch.
            latents: unit-variance starting noise [images, C, height/8, width/8] instead of
                the seeded draw (with `image`: the noise added to the encoded image).
            image, strength: image-to-image as diffusers' StableDiffusionImg2ImgPipeline: the
                image is VAE-encoded, noised to step `steps - int(steps * strength)`, denoised.
            output: "pil" for a list of PIL images, "np" for float32 [B, H, W, 3] in [0, 1]
                (diffusers' output_type="np").
            callback: called after every scheduler step as callback(i, total, latents), i from 0
                to total - 1; total is the number of model evaluations left to run (heun: about
                2 * steps; image-to-image: only the remaining ones).
            image_noise: the VAE-sampling noise of image-to-image, [images or 1, C, h, w],
                instead of the seeded draw.
            rng: the noise source of stochastic schedulers instead of the seeded generators.
            noise: the seeded generators: "portable" (PortableNoise, every sdport host makes the
                same image) or "torch" (torch's CPU generator, TorchCPUNoise: the image diffusers
                makes with `generator=torch.Generator().manual_seed(seed + i)` for image i).
            eta: DDIM's eta (ddim only, as diffusers' pipeline passes it to DDIMScheduler.step):
                0 is deterministic DDIM, 1 has DDPM's noise level.
            guidance_rescale: diffusers' guidance_rescale (Lin et al. 2023, 3.4), 0 to 1: the
                guided prediction pulled toward the text prediction's standard deviation, which
                keeps zero-terminal-SNR (v-prediction) models from over-exposing at high guidance.
            clip_skip: diffusers' clip_skip: the prompts' embeddings from the text encoder's layer
                `clip_skip` before the last, through its final LayerNorm (1 is AUTOMATIC1111's
                "Clip skip: 2"); as in diffusers the negative prompts' stay the last layer's. Needs
                a folder exported by this version of sdport (the text encoder's CLIP_SKIP_OUTPUT).
            progress: show a tqdm progress bar.
        Raises:
            UsageError for an invalid request; SdportError if a component produces NaN/inf.
        """
        m = self.manifest
        prompts, negatives = check_request(
            prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=seed,
            num_images=num_images, strength=strength, image_to_image=image is not None, eta=eta,
            guidance_rescale=guidance_rescale, clip_skip=clip_skip,
        )
        steps, per_prompt, guidance, clip_skip = int(steps), int(num_images), float(guidance), int(clip_skip)
        num_images = per_prompt * len(prompts)
        if output not in ("pil", "np"):
            raise UsageError(f"output must be 'pil' or 'np', got {output!r}")
        self._check_clip_skip(clip_skip)
        if noise not in NOISE_KINDS:
            raise UsageError(f"noise must be one of {', '.join(NOISE_KINDS)}, got {noise!r}")
        name, config = self._scheduler(scheduler)
        config = schedulers.with_eta(name, config, float(eta))
        schedulers.schedule(name, config, steps)  # refuses steps > num_train_timesteps before any work

        source = None
        if image is not None:
            strength = float(strength)
            if "vae_encoder" not in m.graphs:
                raise ManifestError(f"{self.folder}: no vae_encoder graph, needed for image-to-image; re-export the model")
            source = imgs.load_image(image, self._say)
            if width is None and height is None:
                width, height = (s - s % self.size_multiple for s in source.size)
                if (width, height) != source.size and self._say:
                    self._say(f"input image {source.size[0]}x{source.size[1]} resized to {width}x{height} "
                              f"(a multiple of {self.size_multiple})")
        width = m.default_image_size if width is None else width
        height = m.default_image_size if height is None else height
        check_size(m, width, height)
        shape = (num_images, m.latent_channels, height // m.vae_scale, width // m.vae_scale)
        seeded = BatchNoise(seed, num_images) if noise == "portable" else TorchBatchNoise(seed, num_images)

        start_step = 0
        if source is not None:
            start_step = steps - int(steps * strength)
            if start_step >= steps:
                raise UsageError(
                    f"strength {strength} with {steps} steps leaves no denoising step "
                    f"(int(steps * strength) = 0); raise strength or steps"
                )
            pixels = imgs.preprocess(source, width, height)
            if not np.isfinite(pixels).all():
                raise UsageError("the input image has NaN or inf pixels")
            image_latents = self._encode_image(pixels, shape, image_noise, seeded)
            start_noise = _given_noise("latents", latents, shape) if latents is not None else _draw(seeded, shape)
            x = schedulers.add_noise(name, config, image_latents, start_noise, steps, start_step)
        else:
            x = _given_noise("latents", latents, shape) if latents is not None else _draw(seeded, shape)

        embeddings = self._embed(prompts, negatives, per_prompt, guidance > 1, clip_skip)
        if rng is not None:
            step_noise = contextlib.nullcontext(rng)
        elif isinstance(seeded, BatchNoise):
            # Portable noise is drawn a step ahead, during the UNet's run (noise.LookaheadNoise).
            # torch's generator is sequential, each draw from the state the last one left, so its
            # draws are made when asked for (0.6 ms at SD 1.5's latents against 1.1 ms portable).
            step_noise = LookaheadNoise(seeded)
        else:
            step_noise = contextlib.nullcontext(seeded)
        with step_noise as noise_source:
            x = self._denoise(
                name, config, x, steps, start_step, embeddings, guidance, float(guidance_rescale), noise_source,
                callback, progress,
            )
        pixels_out = self._decode(x)
        result = imgs.postprocess(pixels_out)
        return result if output == "np" else imgs.to_pil(result)

    def _check_clip_skip(self, clip_skip: int) -> None:
        if not clip_skip:
            return
        outputs = {spec.name: spec for spec in self.manifest.graphs["text_encoder"].outputs}
        if CLIP_SKIP_OUTPUT not in outputs:
            raise UsageError(
                f"clip_skip: {self.folder}'s text encoder gives only its last layer's hidden states; "
                f"re-export the model with this version of sdport for clip_skip"
            )
        most = outputs[CLIP_SKIP_OUTPUT].shape[1]
        if isinstance(most, int) and clip_skip > most:
            raise UsageError(f"clip_skip {clip_skip} is too many: this text encoder has {most + 1} layers, so at most {most}")

    def _embed(self, prompts: list[str], negatives: list[str], count: int, guided: bool, clip_skip: int = 0) -> np.ndarray:
        """Text embeddings [2B, T, D], B = len(prompts) * count, as diffusers stacks them: each
        negative prompt `count` times, then each prompt `count` times; without guidance [B, T, D].
        With `clip_skip` the prompts' (not the negative prompts') from that layer before the last."""
        texts = negatives + prompts if guided else prompts
        labels = text_labels("prompt", len(prompts))
        if guided:
            labels = text_labels("negative prompt", len(negatives)) + labels
        ids = self.tokenizer.encode(texts, labels=labels)
        with self._graph("text_encoder") as graph:
            out = graph.run({"input_ids": ids}, last=True)
        hidden = np.array(out["last_hidden_state"], dtype=np.float32)  # [len(texts), T, D]
        if clip_skip:
            positive = slice(len(texts) - len(prompts), len(texts))
            hidden[positive] = out[CLIP_SKIP_OUTPUT][positive, clip_skip - 1]
        if not np.isfinite(hidden).all():
            raise SdportError("text_encoder: output has NaN or inf; the graph is broken, re-export the model")
        return np.repeat(hidden, count, axis=0)  # [neg_0 x count, neg_1 x count, ...; pos_0 x count, ...]

    def _encode_image(
        self, pixels: np.ndarray, shape: tuple[int, ...], image_noise: np.ndarray | None, seeded: NoiseSource,
    ) -> np.ndarray:
        """VAE-encode and sample as diffusers' DiagonalGaussianDistribution: mean + std * noise."""
        with self._graph("vae_encoder") as graph:
            parameters = graph.run({"sample": pixels}, last=True)["latent_parameters"]  # [1, 2C, h, w]
        if not np.isfinite(parameters).all():
            raise SdportError(f"vae_encoder: output has NaN or inf for this image; {self._vae_hint('vae_encoder')}")
        if parameters.shape[2:] != shape[2:]:
            raise SdportError(f"vae_encoder: output {parameters.shape}, expected latents {shape[2:]} per image")
        mean, logvar = np.split(parameters.astype(np.float32), 2, axis=1)
        logvar = np.clip(logvar, -30.0, 20.0)  # as diffusers, before exp
        std = np.exp(0.5 * logvar)
        if image_noise is not None:
            eps = _given_noise("image_noise", image_noise, shape, broadcast=True)
        else:
            eps = _draw(seeded, shape)
        return (mean + std * eps) * np.float32(self.manifest.vae_scaling_factor)

    def _denoise(
        self, name: str, config: dict[str, Any], x: np.ndarray, steps: int, start_step: int,
        embeddings: np.ndarray, guidance: float, guidance_rescale: float, noise_source: NoiseSource,
        callback: Callback | None, progress: bool,
    ) -> np.ndarray:
        count = x.shape[0]
        guided = embeddings.shape[0] == 2 * count
        current = {"step": 0}
        evaluations = schedulers.schedule(name, config, steps).evaluations(start_step)
        # guidance_rescale divides by standard deviations, which no linear plan can: those runs,
        # and configs whose steps are not linear, take the scheduler's step functions.
        plan = None if guidance_rescale else linear_loop.compile_plan(
            name, config, steps, start_step, guidance if guided else None)
        # No tqdm at all without a bar: even disabled, making one costs a tiny model's 1% of a step.
        bar_or_none = tqdm(total=evaluations, desc="denoising", unit="step") if progress else contextlib.nullcontext()
        with self._graph("unet") as unet, bar_or_none as bar:
            unet.keep_on_device("encoder_hidden_states", embeddings)
            timestep_port = unet.input("timestep")

            def model(x_in: np.ndarray, t: Any) -> np.ndarray:
                """The UNet's output for `x_in`, guided."""
                sample = np.concatenate([x_in, x_in]) if guided else x_in  # [2B | B, C, h, w]
                feeds = {"sample": sample, "timestep": self._timestep(timestep_port, t, name),
                         "encoder_hidden_states": embeddings}
                out = unet.run(feeds, last=current["step"] + 1 == evaluations)["out_sample"]
                current["out"], current["timestep"] = out, t
                if not guided:
                    return out
                uncond, text = out[:count], out[count:]
                guided_out = uncond + guidance * (text - uncond)
                return _rescaled(guided_out, text, guidance_rescale) if guidance_rescale else guided_out

            def not_finite(step: int, total: int, in_output: bool, timestep: float) -> SdportError:
                if in_output:
                    return SdportError(
                        f"unet: output has NaN or inf at step {step + 1} (timestep {float(timestep):g}); "
                        f"with an fp16 export try --provider cpu or an fp32 export"
                    )
                return SdportError(f"{name}: latents have NaN or inf after step {step + 1} of {total}")

            def report(step: int, total: int, latents: np.ndarray) -> None:
                if bar is not None:
                    bar.update(1)
                if callback is not None:
                    callback(step, total, latents)

            def on_step(step: int, total: int, latents: np.ndarray) -> None:
                # As linear_loop checks: after the scheduler has folded the UNet's output in.
                if linear_loop.has_non_finite(latents):
                    raise not_finite(step, total, not np.isfinite(current["out"]).all(), current["timestep"])
                current["step"] = step + 1
                report(step, total, latents)

            # A UNet that gives NaN or inf is reported in one line; NumPy's own warnings about the
            # guidance and scheduler arithmetic on those values would come first, with a source
            # line each, so they are off for the loop.
            try:
                with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                    if plan is None:
                        return schedulers.denoise(
                            name, config, model, x, steps, rng=noise_source, start_step=start_step, callback=on_step,
                        )
                    # The compiled loop's input buffer is the same feed at every run, and the
                    # timesteps are cast here once: each step is one onnxruntime call.
                    loop = linear_loop.Loop(plan, x.shape)
                    each = [{"timestep": self._timestep(timestep_port, step.timestep, name)} for step in plan.steps]
                    unet_run = unet.repeated(
                        "out_sample", {"sample": loop.unet_input, "encoder_hidden_states": embeddings}, each)
                    try:
                        return loop.run(x, unet_run, noise_source, report if progress or callback else None)
                    except linear_loop.NotFinite as bad:
                        raise not_finite(bad.k, len(plan.steps), bad.in_output, plan.steps[bad.k].timestep) from None
            finally:
                unet.release_device()

    @staticmethod
    def _timestep(port: Port, t: Any, scheduler: str) -> np.ndarray:
        """The timestep in the dtype and shape the UNet graph declares (scalar float32 from sdport)."""
        value = np.asarray(t, dtype=np.float64)
        if np.dtype(port.dtype).kind == "i" and value != np.round(value):
            raise UsageError(
                f"unet: this graph takes an integer timestep, but scheduler {scheduler!r} uses "
                f"fractional ones ({float(value):g}); choose one with integer timesteps (ddim, pndm, "
                f"euler without karras sigmas) or re-export the model with sdport"
            )
        if len(port.shape) == 0:
            return np.asarray(value, dtype=port.dtype)
        size = port.shape[0] if isinstance(port.shape[0], int) else 1
        return np.full((size,), value, dtype=port.dtype)

    def _vae_hint(self, name: str) -> str:
        if self.manifest.graphs[name].precision == "fp16":
            return "this folder's VAE is fp16 and overflowed: re-export with --fp16 --fp32-vae"
        return "its input was finite, so its weights may hold NaN or inf: re-export from a sound checkpoint"

    def _decode(self, x: np.ndarray) -> np.ndarray:
        """latents / scaling factor through the VAE decoder -> pixels [B, 3, H, W] in about [-1, 1]."""
        latents = x / np.float32(self.manifest.vae_scaling_factor)
        # One image at a time, as diffusers' VAE slicing: the decoder's activations dominate
        # memory, and an image's pixels don't depend on the batch it was made in (onnxruntime's
        # kernels split work by batch size, which moves the last bits).
        with self._graph("vae_decoder") as graph:
            pixels = np.concatenate([
                graph.run({"latent_sample": latents[i : i + 1]}, last=i + 1 == len(x))["sample"] for i in range(len(x))
            ])
        bad = [i for i in range(len(pixels)) if not np.isfinite(pixels[i]).all()]
        if bad:
            raise SdportError(f"vae_decoder: image(s) {bad} have NaN or inf pixels; {self._vae_hint('vae_decoder')}")
        return pixels
