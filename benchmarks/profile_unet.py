"""Where a UNet step's (or VAE decode's) time goes, and how close it runs to what this CPU can do.

    python benchmarks/profile_unet.py --onnx FOLDER [--int8 FOLDER] [--model DIFFUSERS_FOLDER]
                                      [--size 512] [--graph unet|vae_decoder]
                                      [--out benchmarks/results/profile.json]

One batch-2 UNet step (classifier-free guidance), or one batch-1 VAE decode, of each sdport
folder under onnxruntime's profiler, after a first run: time per operator type, and that type's
arithmetic, counted from the shapes the profiler records (2 operations per multiply-add), so its
rate in GFLOP/s. Beside it, in the same run and at the same thread count:

  GEMM ceiling  the rate of one large matrix product (4096 x 4096 x 4096): fp32 in onnxruntime
                and in PyTorch, int8 in onnxruntime (DynamicQuantizeMatMul, as in the int8 UNet).
                Convolutions and attention rarely run faster than this on a CPU.
  PyTorch       with --model, diffusers' model on the same weights and inputs (median of --runs):
                its time, its rate over the same arithmetic, and its own count of that arithmetic
                (torch's FlopCounterMode, which leaves out attention) as a check of ours.

The floor a step could reach at the ceiling is (arithmetic / ceiling); a target below that floor
can't be met by scheduling or fusion, only by doing less arithmetic or cheaper arithmetic (int8).
Each measurement runs in a fresh process (bench_sd.spawn), under --lock.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_sd  # noqa: E402  (after the path setup)

GEMM = 4096  # M = K = N of the ceiling's matrix product
GEMM_RUNS = 5


# --- arithmetic per node, from the profiler's recorded shapes ----------------------------------


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def node_flops(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> int:
    """Operations (2 per multiply-add) of one node; 0 for the types that do no products."""
    if op in ("Conv", "ConvInteger", "FusedConv", "QLinearConv"):
        weight = inputs[3] if op == "QLinearConv" else inputs[1]  # [Cout, Cin/groups, kh, kw]
        return 2 * _prod(outputs[0]) * _prod(weight[1:])
    if op in ("MatMul", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "Gemm"):
        # B's last two dims are K and N in either order (transposed or not), and N is the output's last.
        inner = _prod(inputs[1][-2:]) // int(outputs[0][-1])
        return 2 * _prod(outputs[0]) * inner
    if op == "Attention":  # packed QKV projection + attention; x [B, S, Din], weights [Din, 3D]
        x, w = inputs[0], inputs[1]
        return 2 * _prod(x) * int(w[1]) + attention_flops(op, inputs)
    return attention_flops(op, inputs)


def attention_flops(op: str, inputs: list[list[int]]) -> int:
    """The Q.K^T and P.V products of an attention node (PyTorch's FlopCounterMode has no formula for
    its CPU attention kernel, so these are what its count leaves out)."""
    if op == "MultiHeadAttention":  # q [B, S, D]; k [B, Sk, D] (or [B, N, Sk, H] when pre-split)
        q, k = inputs[0], inputs[1]
        kv_length = k[1] if len(k) == 3 else k[2]
        return 4 * _prod(q) * int(kv_length)
    if op == "Attention":
        x, w = inputs[0], inputs[1]
        return 4 * _prod(x[:-1]) * int(x[1]) * (int(w[1]) // 3)
    return 0


# A control-flow node's time is that of the subgraph it ran, whose nodes the profiler records too
# (the Winograd If nodes: counted both ways, the kernel times summed to 10.3 s of an 8.5 s step).
CONTROL_FLOW = ("If", "Loop", "Scan")
COSTLIEST_SHAPES = 12  # node groups (operator, input shapes) listed by time


def constant_shapes(path: Path) -> dict[str, list[list[int] | None]]:
    """Per node of the graph at `path` (subgraphs included): each input's dims where it is an
    initializer, else None."""
    import onnx

    def walk(graph, known: dict[str, list[int]], out: dict) -> dict:
        known = {**known, **{t.name: list(t.dims) for t in graph.initializer}}
        for node in graph.node:
            out[node.name] = [known.get(name) for name in node.input]
            for attribute in node.attribute:
                for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                    walk(sub, known, out)
        return out

    return walk(onnx.load_model(str(path), load_external_data=False).graph, {}, {})


def _input_shapes(event: dict, constants: dict[str, list[list[int] | None]]) -> list[list[int]]:
    """A node's input shapes. The profiler leaves out the weights a kernel packed ahead (MatMul's
    and Gemm's B, read from the session cache's entry): those come from the graph, filling its
    constant inputs from the second on."""
    recorded = [next(iter(s.values())) for s in event["args"].get("input_type_shape", [])]
    inputs = constants.get(event["name"][: -len("_kernel_time")], [])
    missing = len(inputs) - len(recorded)
    if missing <= 0:
        return recorded
    rebuilt, given = [], iter(recorded)
    for index, dims in enumerate(inputs):
        if dims is not None and index > 0 and missing > 0:
            rebuilt.append(dims)
            missing -= 1
        else:
            rebuilt.append(next(given, []))
    return rebuilt


def summarize_profile(events: list[dict], run_index: int, runs: int,
                      constants: dict[str, list[list[int] | None]] | None = None) -> dict:
    """Per operator type: seconds, share and operations of run `run_index` of `runs` in the trace.
    `constants`: the graph's constant_shapes, for the inputs the profiler leaves out."""
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    per_run = len(nodes) // runs
    chosen = [e for e in nodes[run_index * per_run:(run_index + 1) * per_run]
              if e["args"]["op_name"] not in CONTROL_FLOW]
    # Per operator and input shapes (which products run below the ceiling, and which shapes cost
    # the most, is what an operator's total hides); the operators' totals are their sums.
    groups: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    attention = 0
    for e in chosen:
        op = e["args"]["op_name"]
        shapes_in = _input_shapes(e, constants or {})
        shapes_out = [next(iter(s.values())) for s in e["args"].get("output_type_shape", [])]
        groups[op, json.dumps(shapes_in)].update(s=e["dur"] / 1e6, flops=node_flops(op, shapes_in, shapes_out), nodes=1)
        attention += attention_flops(op, shapes_in)
    ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (op, _), group in groups.items():
        ops[op].update(group)
    total = sum(o["s"] for o in ops.values())

    def by_time(items):
        return sorted(items, key=lambda kv: -kv[1]["s"])

    def summary(g: collections.Counter) -> dict:
        return {"s": g["s"], "share": g["s"] / total, "gflop": g["flops"] / 1e9, "nodes": g["nodes"]}

    shapes = [{"op": op, "inputs": inputs, **summary(g)} for (op, inputs), g in by_time(groups.items())]
    return {"kernel_s": total, "gflop": sum(o["flops"] for o in ops.values()) / 1e9,
            "attention_gflop": attention / 1e9, "ops": {op: summary(g) for op, g in by_time(ops.items())},
            "shapes": shapes[:COSTLIEST_SHAPES]}


# --- workers: each runs in its own process and prints one JSON line ----------------------------


def worker_profile_sdport(folder: str, size: int, graph: str = "unet") -> dict:
    import numpy as np

    from sdport.export.quantize import unet_feeds
    from sdport.models.manifest import read_manifest
    from sdport.runtime.graph_files import check_graph_files
    from sdport.runtime.sessions import open_session

    manifest = read_manifest(Path(folder))
    spec = manifest.graphs[graph]
    fused = spec.optimization == "ort"
    prefix = str(Path(tempfile.mkdtemp(prefix="sdport-profile-")) / graph)
    session, loaded = open_session(check_graph_files(Path(folder), spec.file), "cpu", fused,
                                   ["CPUExecutionProvider"], profile_prefix=prefix)  # as the pipeline
    latent = size // manifest.vae_scale
    if graph == "unet":
        feeds = unet_feeds(manifest, latent)
    else:  # one image's latents, as the pipeline decodes them
        noise = np.random.default_rng(0).standard_normal((1, manifest.latent_channels, latent, latent))
        feeds = {"latent_sample": noise.astype(np.float32)}
    # The first run allocates its memory.
    times = bench_sd.run_times(lambda: session.run(None, feeds), 2)
    trace = Path(session.end_profiling())
    summary = summarize_profile(json.loads(trace.read_text()), run_index=1, runs=2, constants=constant_shapes(loaded))
    trace.unlink()
    trace.parent.rmdir()
    return {"first_s": times[0], "step_s": times[1], **summary}


def _best_rate(run, flops: int) -> float:
    best = min(bench_sd.run_times(run, 1 + GEMM_RUNS)[1:])  # the first is the warm-up
    return flops / best / 1e9


def worker_gemm_onnxruntime() -> dict:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from sdport.runtime.options import session_options

    rng = np.random.default_rng(0)
    a = rng.standard_normal((GEMM, GEMM), dtype=np.float32)
    b = rng.standard_normal((GEMM, GEMM), dtype=np.float32)
    b_int8 = rng.integers(-127, 128, (GEMM, GEMM), dtype=np.int8)
    rates = {}
    for name, node, initializers in (
        ("fp32", helper.make_node("MatMul", ["a", "b"], ["y"]), [numpy_helper.from_array(b, "b")]),
        ("int8", helper.make_node("DynamicQuantizeMatMul", ["a", "b", "b_scale"], ["y"], domain="com.microsoft"),
         [numpy_helper.from_array(b_int8, "b"), numpy_helper.from_array(np.array(0.01, np.float32), "b_scale")]),
    ):
        graph = helper.make_graph([node], name, [helper.make_tensor_value_info("a", TensorProto.FLOAT, [GEMM, GEMM])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [GEMM, GEMM])], initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        session = ort.InferenceSession(model.SerializeToString(), sess_options=session_options("cpu", fused=True),
                                       providers=["CPUExecutionProvider"])
        rates[name] = _best_rate(lambda: session.run(None, {"a": a}), 2 * GEMM**3)
    return {"fp32_gflops": rates["fp32"], "int8_gops": rates["int8"]}


def worker_gemm_torch() -> dict:
    torch = bench_sd._torch_setup()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(GEMM, GEMM, generator=g)
    b = torch.randn(GEMM, GEMM, generator=g)
    return {"fp32_gflops": _best_rate(lambda: torch.mm(a, b), 2 * GEMM**3)}


def _torch_run(model: str, size: int, graph: str):
    """diffusers' model for `graph` (a UNet step or a batch-1 VAE decode) at `size` pixels, as one
    call on fixed random inputs."""
    if graph == "unet":
        from diffusers import UNet2DConditionModel

        return bench_sd.torch_unet_step(UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval(), size)
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval()
    latent = size // 8
    sample = torch.randn(1, vae.config.latent_channels, latent, latent, generator=torch.Generator().manual_seed(0))
    return lambda: vae.decode(sample)


def worker_vae_torch(model: str, size: int, runs: int) -> dict:
    torch = bench_sd._torch_setup()
    run = _torch_run(model, size, "vae_decoder")
    with torch.inference_mode():
        times = bench_sd.run_times(run, runs + 1)  # the first is the warm-up
    return {"warmup_s": times[0], "times_s": times[1:]}


def worker_flops_torch(model: str, size: int, graph: str) -> dict:
    """The same graph's arithmetic as PyTorch's own FlopCounterMode counts it (attention left out):
    an independent check of the count taken from onnxruntime's profile."""
    torch = bench_sd._torch_setup()
    from torch.utils.flop_counter import FlopCounterMode

    run = _torch_run(model, size, graph)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        run()
    return {"gflop": counter.get_total_flops() / 1e9}


worker_unet_torch = bench_sd.worker_unet_torch
WORKERS = {name[len("worker_"):]: fn for name, fn in globals().items() if name.startswith("worker_")}


# --- the run -----------------------------------------------------------------------------------


def bench(args) -> dict:
    def spawn(worker: str, **kwargs) -> dict:
        return bench_sd.spawn(worker, args.lock, script=__file__, **kwargs)

    folders = {"fp32": args.onnx, **({"int8": args.int8} if args.int8 else {})}
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": bench_sd.machine(),
              "graph": args.graph, "size": args.size, "folders": {k: str(v) for k, v in folders.items()}}
    result["gemm"] = {"onnxruntime": spawn("gemm_onnxruntime")}
    if args.model:
        result["gemm"]["torch"] = spawn("gemm_torch")
        torch_run = spawn("unet_torch" if args.graph == "unet" else "vae_torch", model=str(args.model),
                          size=args.size, runs=args.runs)
        result["torch"] = {"first_s": torch_run["warmup_s"], "step_s": bench_sd.median(torch_run["times_s"]),
                           "gflop": spawn("flops_torch", model=str(args.model), size=args.size, graph=args.graph)["gflop"]}
    result["sdport"] = {name: spawn("profile_sdport", folder=str(folder), size=args.size, graph=args.graph)
                        for name, folder in folders.items()}
    return result


def _is_int8(op: str) -> bool:
    return "Integer" in op or "Quantize" in op  # ConvInteger, DynamicQuantizeMatMul, ...


def table(r: dict) -> str:
    gemm = r["gemm"]
    # The best fp32 product rate measured on this machine, by either library: the ceiling.
    fp32_ceiling = max(g["fp32_gflops"] for g in gemm.values())
    int8_ceiling = gemm["onnxruntime"]["int8_gops"]
    what = "UNet step, batch 2" if r.get("graph", "unet") == "unet" else "VAE decoder run, batch 1"
    lines = [f"{what}, {r['size']}x{r['size']}; {r['machine']['cpu']}, {r['machine']['threads']} threads; "
             f"{r['date']}. GEMM ({GEMM}^3, best of {GEMM_RUNS}): onnxruntime fp32 "
             f"{gemm['onnxruntime']['fp32_gflops']:.0f} GFLOP/s, int8 {int8_ceiling:.0f} GOP/s"
             + (f"; PyTorch fp32 {gemm['torch']['fp32_gflops']:.0f} GFLOP/s" if "torch" in gemm else "")
             + ". Ceilings: the faster fp32 GEMM, the int8 GEMM.", ""]
    for name, p in r["sdport"].items():
        lines += [f"sdport {name}: {p['step_s']:.2f} s per run ({p['first_s']:.2f} s the first), {p['gflop']:.4g} GFLOP, "
                  f"{p['gflop'] / p['step_s']:.0f} GFLOP/s overall", "",
                  "| operator | nodes | time (s) | share | GFLOP | GFLOP/s | of its ceiling |",
                  "|---|---|---|---|---|---|---|"]
        for op, o in p["ops"].items():
            if o["share"] < 0.005:
                continue
            rate = o["gflop"] / o["s"] if o["gflop"] else None
            ceiling = int8_ceiling if _is_int8(op) else fp32_ceiling
            lines.append(f"| {op} | {o['nodes']} | {o['s']:.2f} | {100 * o['share']:.1f}% | "
                         + (f"{o['gflop']:.4g} | {rate:.0f} | {100 * rate / ceiling:.0f}% |" if rate else "- | - | - |"))
        if p.get("shapes"):  # JSON of earlier runs has none
            lines += ["", f"The costliest nodes of sdport {name}, by operator and input shapes:", "",
                      "| operator | inputs | nodes | time (s) | share | GFLOP/s | of its ceiling |",
                      "|---|---|---|---|---|---|---|"]
        for o in p.get("shapes", []):
            rate = o["gflop"] / o["s"] if o["gflop"] and o["s"] else None
            ceiling = int8_ceiling if _is_int8(o["op"]) else fp32_ceiling
            lines.append(f"| {o['op']} | {o['inputs']} | {o['nodes']} | {o['s']:.3f} | {100 * o['share']:.1f}% | "
                         + (f"{rate:.0f} | {100 * rate / ceiling:.0f}% |" if rate else "- | - |"))
        lines.append("")
    fp32 = r["sdport"]["fp32"]
    floor = fp32["gflop"] / fp32_ceiling
    lines.append(f"fp32 floor: {fp32['gflop']:.4g} GFLOP at the fp32 ceiling ({fp32_ceiling:.0f} GFLOP/s) = "
                 f"{floor:.2f} s per run.")
    # PyTorch computes convolutions directly; a folder with Winograd convolutions does less.
    direct_gflop = fp32["gflop"]
    if "gflop" in r.get("torch", {}):
        outside = fp32["gflop"] - fp32["attention_gflop"]
        direct_gflop = r["torch"]["gflop"] + fp32["attention_gflop"]
        lines.append(f"Check of the count: outside attention (Q.K^T, P.V: {fp32['attention_gflop']:.4g} GFLOP) "
                     f"onnxruntime's profile gives {outside:.4g} GFLOP and PyTorch's FlopCounterMode, which has "
                     f"no formula for its CPU attention kernel, {r['torch']['gflop']:.4g} "
                     f"({r['torch']['gflop'] / outside:.4f}x)"
                     + ("." if abs(r["torch"]["gflop"] / outside - 1) < 0.01 else
                        f": the fp32 folder's Winograd convolutions do {r['torch']['gflop'] - outside:.4g} GFLOP less "
                        f"than direct ones (its direct-arithmetic floor would be {direct_gflop / fp32_ceiling:.2f} s)."))
    if "torch" in r:
        t = r["torch"]["step_s"]
        lines.append(f"PyTorch (diffusers eager fp32): {t:.2f} s per run ({r['torch']['first_s']:.2f} s the first) = "
                     f"{direct_gflop / t:.0f} GFLOP/s over its own (direct) "
                     f"arithmetic. Ratios to it: the fp32 floor {floor / t:.2f}x"
                     + "".join(f", sdport {n} {p['step_s'] / t:.2f}x" for n, p in r["sdport"].items()) + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, help="an sdport fp32 export")
    parser.add_argument("--int8", type=Path, default=None, help="its int8 folder (sdport quantize)")
    parser.add_argument("--model", type=Path, default=None, help="the diffusers folder, for PyTorch's step")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels")
    parser.add_argument("--graph", choices=["unet", "vae_decoder"], default="unet",
                        help="the graph to profile (vae_decoder: batch 1, as the pipeline decodes)")
    parser.add_argument("--runs", type=int, default=3, help="timed PyTorch runs (after a warm-up)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "profile.json")
    parser.add_argument("--lock", default="/tmp/sd15.lock", help="flock file taken per measurement")
    bench_sd.add_worker_arguments(parser)
    args = parser.parse_args()
    if bench_sd.run_worker(WORKERS, args):
        return
    if not args.onnx:
        parser.error("--onnx is required")
    bench_sd.run_and_write(args, bench, table)


if __name__ == "__main__":
    main()
