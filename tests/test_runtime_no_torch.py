"""The runtime runs where torch, transformers, diffusers and onnx cannot be imported.

A fresh interpreter installs an import blocker before anything else, then generates through
`Pipeline` and through the CLI; any attempt to import a blocked package (even lazily, even
inside a try) fails the run, because the blocker records it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from PIL import Image

BLOCKER = textwrap.dedent(
    """
    import sys
    BLOCKED = ("torch", "transformers", "diffusers", "onnx", "sdport.export")
    ATTEMPTS = []

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                ATTEMPTS.append(name)
                raise ImportError(f"{name} is blocked: the runtime must not import it")
            return None

    already = [m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED)]
    assert not already, already
    sys.meta_path.insert(0, Blocker())
    """
)

SCRIPT = BLOCKER + textwrap.dedent(
    """
    from pathlib import Path
    model, out = Path(sys.argv[1]), Path(sys.argv[2])

    from sdport.runtime import Pipeline
    from sdport.runtime.images import save_png
    pipe = Pipeline.load(model, provider="cpu")
    image = pipe.generate("a red fox", steps=2, scheduler="euler_ancestral", seed=3, progress=False)[0]
    save_png(image, out / "api.png", "a red fox\\nSteps: 2")
    pipe.generate("a red fox", steps=2, image=image, strength=0.5, progress=False)  # vae_encoder too

    from sdport.cli import main
    status = main(["generate", str(model), "a red fox", "--steps", "2", "-o", str(out / "cli.png"), "-q"])
    assert status == 0, status
    # torch's generator, reproduced without torch
    status = main(["generate", str(model), "a red fox", "--steps", "2", "--noise", "torch", "-q",
                   "--scheduler", "euler_ancestral", "-o", str(out / "torch-noise.png")])
    assert status == 0, status
    assert not ATTEMPTS, f"blocked imports attempted: {ATTEMPTS}"
    print("ok")
    """
)


def test_runtime_and_cli_generate_without_torch(tiny_onnx_dir: Path, tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_onnx_dir), str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
    for name in ("api.png", "cli.png", "torch-noise.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size == (64, 64)
            assert image.text["parameters"].startswith("a red fox\n")
