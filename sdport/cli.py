"""`sdport tiny | export | generate`: the command line.

Imports are lazy: `generate` must run where only the runtime is installed (no torch).
Every SdportError becomes one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sdport import __version__
from sdport.errors import SdportError, UsageError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _say(args: argparse.Namespace):
    """The progress printer: stderr, or nothing with --quiet."""
    if args.quiet:
        return None
    return lambda message: print(message, file=sys.stderr, flush=True)


def _needs_export_extra() -> None:
    # transformers warns at import about optional image processors export never uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise SdportError(
            f"this command needs the export extra ({exc.name} is not installed): "
            "pip install 'sdport[export]'"
        ) from exc


def cmd_tiny(args: argparse.Namespace) -> int:
    _needs_export_extra()
    from sdport.export.tiny import write_tiny_model

    out = Path(args.out)
    if out.exists() and not args.force:
        raise SdportError(f"{out} already exists; choose another OUT or pass --force to replace it")
    write_tiny_model(out, seed=args.seed, progress=not args.quiet)
    if args.single_file:
        from sdport.export.ldm_layout import write_single_file
        from sdport.export.tiny import build_tiny_pipeline

        write_single_file(build_tiny_pipeline(args.seed), Path(args.single_file))
    say = _say(args)
    if say:
        say(f"wrote a tiny random SD 1.x pipeline (diffusers format) to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _needs_export_extra()
    from sdport.export.folder import export_model

    export_model(
        args.source,
        args.out,
        fp16=args.fp16,
        fp32_vae=args.fp32_vae,
        opset=args.opset,
        optimization="none" if args.no_optimize else ("portable" if args.portable else "ort"),
        force=args.force,
        allow_pickle=args.allow_pickle,
        config=args.config,
        family=args.family,
        prediction_type=args.prediction_type,
        winograd=not args.no_winograd,
        guided_prefix=not args.no_guided_prefix,
        ff_chunks=not args.no_ff_chunks,
        report=_say(args),
    )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    _needs_export_extra()  # onnx and onnxruntime's quantizer
    from sdport.export.quantize import quantize_model

    quantize_model(args.model, args.out, force=args.force, report=_say(args))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sdport.runtime.generate import run_generate

    return run_generate(args, say=_say(args))


def cmd_plan(args: argparse.Namespace) -> int:
    from sdport.runtime.plans import write_folder_plans

    paths = write_folder_plans(args.model, args.scheduler, args.steps, out=args.out)
    say = _say(args)
    if say:
        for path in paths:
            say(f"wrote {path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one `sdport: error:` line like every other error."""

    def error(self, message: str):  # argparse prints the usage block and exits; we raise instead
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdport", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sdport {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("-q", "--quiet", action="store_true", help="no progress output")
        return sub

    tiny = command("tiny", "write a tiny random SD 1.x pipeline (diffusers format) for tests and demos")
    tiny.add_argument("out", help="folder to create")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    tiny.add_argument("--single-file", metavar="PATH",
                      help="also write it as one .safetensors in the original (LDM) key layout")
    tiny.add_argument("--force", action="store_true", help="replace OUT if it exists")
    tiny.set_defaults(run=cmd_tiny)

    export = command("export", "export a checkpoint to an ONNX model folder")
    export.add_argument("source", help="diffusers folder, .safetensors checkpoint, or hub id")
    export.add_argument("out", help="model folder to create")
    export.add_argument("--fp16", action="store_true",
                        help="fp16 graphs for GPU providers, the VAE too, as diffusers' fp16 pipelines run it")
    export.add_argument("--fp32-vae", action="store_true",
                        help="with --fp16: keep the VAE in fp32 (more GPU memory), for a VAE whose activations "
                             "overflow fp16 (generate reports that as an error)")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    export.add_argument("--no-optimize", action="store_true", help="keep the traced graphs as they are")
    export.add_argument("--portable", action="store_true",
                        help="standard ONNX operators only (onnxsim), no onnxruntime fusions")
    export.add_argument("--no-winograd", action="store_true",
                        help="keep 3x3 convolutions as Conv (default: Winograd form where it is faster on CPU)")
    export.add_argument("--no-guided-prefix", action="store_true",
                        help="compute the UNet's start for both halves of a guided batch (default, fp32: "
                             "once, when both halves hold the same latents)")
    export.add_argument("--no-ff-chunks", action="store_true",
                        help="run the UNet's transformer feed-forwards on all rows at once (default, fp32: "
                             "in chunks of rows where that is faster on CPU)")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.add_argument("--allow-pickle", action="store_true",
                        help="accept pickled .ckpt/.bin checkpoints (they can run code: trusted sources only)")
    export.add_argument("--config", help="diffusers folder with the component configs of a single-file checkpoint")
    export.add_argument("--family", choices=["sd1", "sd2"], help="for a single-file checkpoint: override detection")
    export.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"],
                        help="override the scheduler's (SD 2.x -base models are epsilon)")
    export.set_defaults(run=cmd_export)

    quantize = command("quantize", "copy a model folder with an int8 UNet (CPU: faster, smaller; images change slightly)")
    quantize.add_argument("model", help="exported model folder (fp32 UNet)")
    quantize.add_argument("out", help="model folder to create")
    quantize.add_argument("--force", action="store_true", help="replace OUT if it exists")
    quantize.set_defaults(run=cmd_quantize)

    generate = command("generate", "generate images from an exported model folder (no PyTorch needed)")
    generate.add_argument("model", help="exported model folder")
    generate.add_argument("prompt", nargs="+", help="one or more prompts: --num-images images of each, in one batch")
    generate.add_argument("--negative", default="", help="negative prompt, for every prompt")
    generate.add_argument("--steps", type=int, default=25, help="denoising steps (default: %(default)s)")
    generate.add_argument("--guidance", type=float, default=7.5,
                          help="classifier-free guidance scale; 1 or less runs without it (default: %(default)s)")
    generate.add_argument("--guidance-rescale", type=float, default=0.0,
                          help="0-1: the guided prediction pulled toward the text prediction's spread, for "
                               "v-prediction models that over-expose (diffusers' guidance_rescale; default: %(default)s)")
    generate.add_argument("--clip-skip", type=int, default=0,
                          help="the prompt's embeddings from this many text-encoder layers before the last "
                               "(diffusers' clip_skip; 1 is AUTOMATIC1111's 'Clip skip: 2'; default: %(default)s)")
    generate.add_argument("--eta", type=float, default=0.0,
                          help="ddim only: 0 is deterministic, 1 adds DDPM's noise (default: %(default)s)")
    generate.add_argument("--scheduler", default=None,
                          help="e.g. euler_ancestral, dpmpp_2m_karras (an unknown name lists them all; "
                               "default: the folder's scheduler)")
    generate.add_argument("--seed", type=int, default=0,
                          help="image i of the batch uses SEED + i, which its PNG records; -1: a random one "
                               "(default: %(default)s)")
    generate.add_argument("--noise", choices=["portable", "torch"], default="portable",
                          help="the seeded noise: portable (the same image in every sdport host) or torch "
                               "(torch's CPU generator: diffusers' image for generator=torch.manual_seed(SEED)) "
                               "(default: %(default)s)")
    size_help = "pixels, a multiple of 8 times the UNet's down-sampling (SD 1.x/2.x: 64; default: the model's native size)"
    generate.add_argument("--width", type=int, default=None, help=size_help)
    generate.add_argument("--height", type=int, default=None, help=size_help)
    generate.add_argument("--num-images", type=int, default=1, help="images of each prompt (default: %(default)s)")
    generate.add_argument("--image", help="input image for image-to-image")
    generate.add_argument("--strength", type=float, default=None,
                          help="image-to-image: how much of the input is noised away, 0-1 (default: 0.8)")
    generate.add_argument("--provider", default="auto", help="auto, cpu, cuda or dml")
    generate.add_argument("--low-memory", action="store_true",
                          help="hold one component's session at a time, opened when needed and freed after "
                               "(less GPU memory; on CPU the default already lets go of each component's weights)")
    generate.add_argument("-o", "--out", default="sdport.png", help="output PNG (numbered for several)")
    generate.add_argument("--overwrite", action="store_true", help="replace existing output files")
    generate.set_defaults(run=cmd_generate)

    plan = command("plan", "write sampling plans (JSON) for hosts in other languages (docs/CONTRACT.md)")
    plan.add_argument("model", help="exported model folder")
    plan.add_argument("--scheduler", action="append", required=True,
                      help="e.g. euler, dpmpp_2m, euler_ancestral, dpmpp_2m_karras (repeatable)")
    plan.add_argument("--steps", type=int, nargs="+", required=True,
                      help="step counts: one plan per scheduler and count")
    plan.add_argument("-o", "--out", help="write the single plan here instead of MODEL/plans/<scheduler>-<steps>.json")
    plan.set_defaults(run=cmd_plan)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except SdportError as exc:
        print(f"sdport: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sdport: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    # Last resort for what the user's machine, not sdport, caused (a read-only folder, a full
    # disk, a file where a folder should be): still one line. Bugs keep their traceback.
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"sdport: error: {where}{_one_line(exc.strerror or exc)}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError as exc:
        print(
            f"sdport: error: out of memory ({_one_line(exc)}); use a smaller --width/--height or "
            "--num-images, or --low-memory",
            file=sys.stderr,
        )
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
