"""The denoising loop's scheduler and Python overhead per step, A/B across source trees, CPU.

    python benchmarks/loop_overhead.py [--trees DIR [DIR ...]] [--rounds 6] [--images 60]
                                       [--steps 10] [--folder ONNX_DIR] [--out FILE.json]

bench_sd.py's overhead row with less noise, for comparing versions of the loop: one process per
tree and round, taken in turn (tree 1, tree 2, ..., then round 2), each making --images text-to-
image images on the tiny model (default: bench_sd.py's cached export) in bench_sd.py's worker,
which times each denoising loop from its first onnxruntime run to its end, less the time inside
onnxruntime's runs. A process's figure is the median over its images but the first. Each tree is
imported from its own folder (PYTHONPATH), e.g. a `git worktree` of the code before a change.
The table gives each process's figure, then each tree's median and its ratio to the first tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(folder: str, images: int, steps: int) -> dict:
    """Runs in a fresh process with the tree to measure first on sys.path: bench_sd.py's sdport
    text-to-image worker, whose loop timing this reports."""
    import sdport  # before bench_sd, which puts this script's own tree first on sys.path

    from bench_sd import worker_t2i_sdport

    with tempfile.TemporaryDirectory() as pngs:
        r = worker_t2i_sdport(folder, size=64, steps=steps, png=str(Path(pngs) / "image.png"), warm=images - 1,
                              low_memory=False)
    return {"sdport": str(Path(sdport.__file__).parents[1]), "overhead_s": r["overhead_s_per_step"],
            "step_s": r["step_s"]}


def spawn(tree: Path, folder: Path, images: int, steps: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker",
               json.dumps({"folder": str(folder), "images": images, "steps": steps})]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    if process.returncode != 0:
        raise RuntimeError(f"worker for {tree} failed:\n{process.stderr[-3000:]}")
    result = json.loads(process.stdout.strip().splitlines()[-1])
    if Path(result["sdport"]).resolve() != tree.resolve():
        raise RuntimeError(f"the worker for {tree} imported sdport from {result['sdport']}")
    return result


def table(result: dict) -> str:
    trees = result["trees"]
    lines = ["| round | " + " | ".join(trees) + " |", "|---" * (len(trees) + 1) + "|"]
    for i, row in enumerate(result["rounds"]):
        cells = [f"{o['overhead_s'] * 1e6:.1f} us = {100 * o['overhead_s'] / o['step_s']:.2f}% of "
                 f"{o['step_s'] * 1e3:.2f} ms" for o in row]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    medians = [statistics.median(row[j]["overhead_s"] for row in result["rounds"]) for j in range(len(trees))]
    lines.append("| median | " + " | ".join(f"{m * 1e6:.1f} us ({m / medians[0]:.2f}x)" for m in medians) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(**json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", type=Path, nargs="+", default=[HERE.parent],
                        help="source trees to compare (default: this one)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--folder", type=Path, default=None,
                        help="an exported tiny folder (default: bench_sd.py's, exported once)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "loop_overhead.json")
    args = parser.parse_args()
    if args.folder is None:
        sys.path.insert(0, str(HERE))
        from bench_sd import prepare

        args.folder = prepare("tiny", None, None, want_int8=False)[1]
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "folder": str(args.folder), "images": args.images,
              "steps": args.steps, "trees": [str(t) for t in args.trees], "rounds": []}
    for _ in range(args.rounds):
        result["rounds"].append([spawn(tree, args.folder, args.images, args.steps) for tree in args.trees])
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
