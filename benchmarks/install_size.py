"""Install size: a fresh venv with only sdport's base install vs a venv that can run diffusers.

    python benchmarks/install_size.py [--out benchmarks/results/install.json] [--fresh]

Both venvs are created in /tmp with the same Python and pip (the reference: torch==2.13.0 CPU,
diffusers, transformers, as pinned by sdport's export extra). Sizes are `du -s` of the whole venv,
so pip and setuptools count on both sides. Results are cached: creating the venvs takes minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENVS = {
    "sdport": [str(REPO)],
    "diffusers": ["torch==2.13.0", "diffusers==0.42.*", "transformers==5.24.*"],
}


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def build(name: str, packages: list[str], root: Path) -> dict:
    venv = root / f"sdport-bench-venv-{name}"
    shutil.rmtree(venv, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-cache-dir", *packages], check=True)
    freeze = subprocess.run([str(venv / "bin" / "pip"), "freeze"], check=True, capture_output=True, text=True).stdout
    size = du_bytes(venv)
    shutil.rmtree(venv, ignore_errors=True)
    return {"packages": packages, "bytes": size, "mb": round(size / 1e6, 1),
            "install_s": round(time.perf_counter() - start, 1), "freeze": freeze.split()}


def measure(out: Path, fresh: bool = False, root: Path = Path("/tmp")) -> dict:
    """{"sdport": {...}, "diffusers": {...}, "ratio": sdport / diffusers}, cached in `out`."""
    if out.exists() and not fresh:
        return json.loads(out.read_text())
    result = {name: build(name, packages, root) for name, packages in VENVS.items()}
    result["ratio"] = result["sdport"]["bytes"] / result["diffusers"]["bytes"]
    result["python"] = sys.version.split()[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "install.json")
    parser.add_argument("--fresh", action="store_true", help="rebuild the venvs even if cached")
    args = parser.parse_args()
    r = measure(args.out, args.fresh)
    print(f"sdport runtime venv {r['sdport']['mb']:.0f} MB, diffusers venv {r['diffusers']['mb']:.0f} MB, "
          f"ratio {r['ratio']:.2f}")
