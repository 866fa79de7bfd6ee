"""Inference speed and memory of napari-apformer; prints Markdown tables.

    python benchmarks/bench_inference.py [--threads 2] [--repeats 7] [--skip-memory]
        [--devices cpu,cuda]

Weights and image: the conformance vector's state_dict (the authors' format, 9 classes, tuned
so that about half the tokens of its brain slice are pruned at tau 0.9) and that brain slice,
from tests/data/. Times are medians over --repeats runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from napari_apformer.engine.inference import Segmenter
from napari_apformer.hardware import describe
from napari_apformer.model import APFormer, load_model
from napari_apformer.model.apformer.flops import slice_flops

VECTOR = Path(__file__).parents[1] / "tests/data/official_gray9_trimmed.npz"
THRESHOLDS = (1.0, 0.9, 0.5)


def load_vector() -> tuple[APFormer, np.ndarray]:
    with np.load(VECTOR) as z:
        state = {k[3:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("sd/")}
        image = z["input"][0, 0].copy()
    return load_model(state), image


def median_ms(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - start)

    timed()
    return statistics.median(timed() for _ in range(repeats))


def model_table(device: torch.device, repeats: int) -> list[str]:
    model, image = load_vector()
    model = model.to(device)
    rows = [
        "| device | batch | token threshold | kept tokens | GFLOP per slice | ms per slice |",
        "|---|---|---|---|---|---|",
    ]
    for batch in (1, 8):
        x = torch.from_numpy(image)[None, None].repeat(batch, 1, 1, 1).to(device)
        for tau in THRESHOLDS:
            with torch.inference_mode():
                keep = model(x[:1], token_threshold=tau).keep
                ms = median_ms(partial(model, x, token_threshold=tau), repeats, device) / batch
            kept = int(keep.sum())
            rows.append(
                f"| {device.type} | {batch} | {tau} | {100 * kept / model.tokens:.1f} % | "
                f"{slice_flops(model, kept) / 1e9:.1f} | {ms:.0f} |"
            )
    return rows


def cache_table(device: torch.device, repeats: int) -> list[str]:
    """A threshold change on a displayed slice (engine, cache warm) against a full pass of the
    engine on an uncached slice with nothing kept for later."""
    model, image = load_vector()
    rows = [
        "| device | token threshold | full pass (ms) | threshold change from cache (ms) | ratio |",
        "|---|---|---|---|---|",
    ]
    for tau in THRESHOLDS:
        full_ms, change_ms = time_threshold_change(model, image, tau, device, repeats)
        rows.append(
            f"| {device.type} | {tau} | {full_ms:.0f} | {change_ms:.0f} | "
            f"{change_ms / full_ms:.2f} |"
        )
    return rows


def time_threshold_change(
    model: APFormer, image: np.ndarray, tau: float, device: torch.device, repeats: int
) -> tuple[float, float]:
    def full() -> None:
        fresh = Segmenter(model, device=device)
        fresh.segment(fresh.prepare(image), token_threshold=tau)

    segmenter = Segmenter(model, device=device)
    prepared = segmenter.prepare(image)
    segmenter.segment(prepared, token_threshold=tau, cache=True)  # the slice goes on screen
    nearby = [tau, tau - 0.001]
    calls = iter(range(10**6))

    def change() -> None:  # alternate between two thresholds: every call is a change
        tau_now = nearby[next(calls) % 2]
        result = segmenter.segment(prepared, token_threshold=tau_now, cache=True)
        assert result.stats.encoder_cache_hits == 1

    # Interleaved, so that a drift in the machine's load touches both alike.
    full_ms, change_ms = zip(
        *((median_ms(full, 1, device), median_ms(change, 1, device)) for _ in range(repeats)),
        strict=True,
    )
    return statistics.median(full_ms), statistics.median(change_ms)


MEMORY_SCRIPT = """
import json, sys, numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
sys.path.insert(0, sys.argv[2])
from bench_inference import load_vector
from napari_apformer.engine.inference import Segmenter
from napari_apformer.hardware import describe

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

model, image = load_vector()
volume = np.repeat(image[None], 180, axis=0).astype(np.float32)  # 256 x 256 x 180
volume += np.linspace(0, 0.05, 180, dtype=np.float32)[:, None, None]  # every slice differs
segmenter = Segmenter(model, device="cpu")
before = rss_kib("VmRSS")
result = segmenter.segment(segmenter.prepare(volume, axis=0))
peak = rss_kib("VmHWM")
print(json.dumps({"before_mib": before / 1024, "peak_mib": peak / 1024,
                  "input_mib": volume.nbytes / 2**20, "seconds": result.stats.seconds,
                  "slices": result.stats.slices}))
"""


def memory_table(threads: int) -> list[str]:
    """Peak resident memory of a 256 x 256 x 180 volume on the CPU, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(threads), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
    )
    m = json.loads(done.stdout.strip().splitlines()[-1])
    above = m["peak_mib"] - m["before_mib"]
    return [
        "| volume | input (MiB) | resident before (MiB) | peak (MiB) | peak above input "
        "and model (MiB) | s per volume | ms per slice |",
        "|---|---|---|---|---|---|---|",
        f"| 256 x 256 x 180, float32, cpu | {m['input_mib']:.0f} | {m['before_mib']:.0f} | "
        f"{m['peak_mib']:.0f} | {above:.0f} | {m['seconds']:.1f} | "
        f"{1000 * m['seconds'] / m['slices']:.0f} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--devices", default=None, help="default: cpu, and cuda when present")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.devices or ("cpu,cuda" if torch.cuda.is_available() else "cpu")
    devices = [torch.device(name) for name in names.split(",")]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"{describe()}, torch {torch.__version__}, CUDA: {gpu}\n")
    for device in devices:
        print("\n".join(model_table(device, args.repeats)), "\n")
        print("\n".join(cache_table(device, args.repeats)), "\n")
    if not args.skip_memory:
        print("\n".join(memory_table(args.threads)))


if __name__ == "__main__":
    main()
