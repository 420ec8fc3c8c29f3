"""Running a CUDA session on fixed device buffers, one set per input shape, optionally as captured
CUDA graphs (onnxruntime's `enable_cuda_graph`).

Plain `session.run` on CUDA allocates device memory for every input and output and copies through
it on each run; a new I/O binding per run did the same. Here each input shape gets device buffers
and a binding once: a run copies the changed inputs into them in place and reads the outputs back.

A UNet step launches hundreds of kernels. Captured once and then replayed as one CUDA graph, it
spends less of the step launching them: an SD 1.5 UNet step in fp16 at batch 2 took 8.1 ms
instead of 10.6 at 256 px and 12.6 instead of 14.9 at 512 (H100, benchmarks/bench_gpu.py).
A replay reads and writes the device addresses it was captured with, which the fixed buffers
give it, and each input shape gets its own graph (onnxruntime's `gpu_graph_id` run option). The
intermediate tensors live in the session's arena at the addresses of the capture, so that arena
must never shrink (Graph.run passes no shrink option to such a session).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from sdport.errors import first_line

# onnxruntime's run-option value that runs without capture or replay.
SKIP = "-1"
# A plain session keeps the buffers of this many input shapes, the least recently used dropped
# first: a long-lived process that makes images of many sizes would otherwise keep them all (a
# 1024 px decode's output alone is 12 MB). A captured session keeps every shape's: onnxruntime
# keeps its graph, which reads and writes them, for the session's life.
PLAIN_SLOTS = 8


def _run_options(graph_id: str) -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", graph_id)
    return options


@dataclass
class _Slot:
    """One input shape: its device buffers, its binding, and which kept inputs it holds."""

    binding: ort.IOBinding
    inputs: dict[str, ort.OrtValue]
    outputs: list[ort.OrtValue]
    options: ort.RunOptions | None  # a captured graph's id; None for a plain session
    versions: dict[str, int] = field(default_factory=dict)  # kept input -> version uploaded


class DeviceRuns:
    """Runs one CUDA session on fixed device buffers per input shape.

    With `captured` (a session made with `enable_cuda_graph`), the first run of a shape runs as
    usual (it also tells the output shapes); onnxruntime captures the graph at a later run of that
    shape and replays it from then on. Should a replay fail, the session goes on without capture,
    as a plain CUDA session, and says so once.
    """

    def __init__(self, name: str, session: ort.InferenceSession, captured: bool, device: str = "cuda") -> None:
        self.name = name
        self.session = session
        self.captured = captured
        self.device = device  # onnxruntime's name of the buffers' device ("cpu" in tests)
        self.output_names = [o.name for o in session.get_outputs()]
        self.slots: dict[tuple, _Slot] = {}
        self.failed = False
        self._uncaptured = _run_options(SKIP) if captured else None
        self.kept: dict[str, np.ndarray] = {}  # inputs fixed for many runs (the text embeddings)
        self._versions: dict[str, int] = {}  # kept input -> number of its latest value

    def keep(self, name: str, value: np.ndarray) -> None:
        """Feeds `value` (contiguous, in the declared dtype) to input `name` until `release`: copied
        into a shape's buffer at that shape's next run, then no more."""
        self.kept[name] = value
        self._versions[name] = self._versions.get(name, 0) + 1

    def release(self) -> None:
        self.kept.clear()

    def run(self, feeds: dict[str, np.ndarray], options: ort.RunOptions | None = None) -> list[np.ndarray]:
        """Outputs for `feeds` (contiguous arrays in the declared dtypes) and the kept inputs. A
        kept input is copied to a shape's buffer only when it changed since that buffer was last
        filled; every other input is copied on every run. `options`: run options of a plain
        session (an arena shrink after a last run, say)."""
        feeds = {**feeds, **self.kept}
        key = tuple((name, value.shape) for name, value in sorted(feeds.items()))
        slot = self.slots.pop(key, None)
        if slot is None:
            return self._first_run(key, feeds, options)
        self.slots[key] = slot  # the most recently used last
        for name, value in feeds.items():
            if name in self.kept:
                if slot.versions.get(name) == self._versions[name]:
                    continue
                slot.versions[name] = self._versions[name]
            slot.inputs[name].update_inplace(value)
        if not self.captured:
            self.session.run_with_iobinding(slot.binding, options)
        elif self.failed:
            self.session.run_with_iobinding(slot.binding, self._uncaptured)
        else:
            try:
                self.session.run_with_iobinding(slot.binding, slot.options)
            except Exception as exc:  # noqa: BLE001 - a capture onnxruntime can't make: run as usual
                self.failed = True
                print(f"{self.name}: CUDA graph replay failed ({first_line(exc)}); running without it",
                      file=sys.stderr)
                self.session.run_with_iobinding(slot.binding, self._uncaptured)
        return [value.numpy() for value in slot.outputs]

    def _first_run(self, key: tuple, feeds: dict[str, np.ndarray], options: ort.RunOptions | None) -> list[np.ndarray]:
        inputs = {name: ort.OrtValue.ortvalue_from_numpy(value, self.device, 0) for name, value in feeds.items()}
        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding, self._uncaptured if self.captured else options)
        results = [value.numpy() for value in binding.get_outputs()]
        # Buffers of the shapes and types this run gave, bound for good (replays write into them),
        # made outside the session's arena, which can then shrink to nothing between calls.
        outputs = [ort.OrtValue.ortvalue_from_numpy(result, self.device, 0) for result in results]
        for name, value in zip(self.output_names, outputs):
            binding.bind_ortvalue_output(name, value)  # in place of the first run's
        graph_id = _run_options(str(len(self.slots) + 1)) if self.captured else None  # 0: default, -1: skip
        self.slots[key] = _Slot(binding, inputs, outputs, graph_id, {name: self._versions[name] for name in self.kept})
        if not self.captured and len(self.slots) > PLAIN_SLOTS:
            del self.slots[next(iter(self.slots))]
        return results
