"""Volume throughput, peak memory, the effect of pruning, and what float16 changes.

    python benchmarks/bench_volume.py [--threads 2] [--devices cpu,cuda] [--quick]

Weights: the shipped default (MNI152 tissue). Volumes: the packaged 2 mm MNI152 sample,
resampled (nearest) to the size asked for and scaled to int16 as a scanner would store it,
so pruning sees a real head. Every configuration runs in a fresh process: peak host memory is
VmHWM minus VmRSS just before the run (model and input already loaded), peak GPU memory is
torch.cuda.max_memory_allocated; model GFLOP/s is what the model counts it spent (the count
tests hold equal to torch's FLOP counter) over the whole run's time. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fresh_process import run_worker
from napari_apformer.hardware import describe

SAMPLE = Path(__file__).parents[1] / "src/napari_apformer/samples/mni152_t1_2mm.nii.gz"


def synthetic_volume(shape: tuple[int, int, int]) -> np.ndarray:
    """(Z, Y, X) int16 from the 2 mm sample: its axial slices, nearest-resampled."""
    import nibabel as nib

    data = np.asarray(nib.load(SAMPLE).dataobj, dtype=np.float32)  # (x, y, z), RAS
    axial = np.transpose(data, (2, 1, 0))  # (z, y, x)
    picks = [
        np.linspace(0, n - 1, m).round().astype(int)
        for n, m in zip(axial.shape, shape, strict=True)
    ]
    volume = axial[np.ix_(*picks)]
    return (volume / volume.max() * 3000 - 1000).astype(np.int16)


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(config: dict) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from napari_apformer.engine.inference import Segmenter
    from napari_apformer.model import load_model
    from napari_apformer.weights import resolve_weights

    torch.set_num_threads(config["threads"])
    model = load_model(resolve_weights(None))
    device = torch.device(config["device"])
    segmenter = Segmenter(
        model, device=device, batch_size=config["batch"], precision=config["precision"]
    )
    volume = synthetic_volume(tuple(config["shape"]))
    if config["kind"] == "model":  # model only: a fixed batch already on the device
        middle = len(volume) // 2 - config["batch"] // 2  # through the brain, not above it
        image = segmenter.prepare(volume[middle : middle + config["batch"]], axis=0)
        x = torch.stack([torch.from_numpy(image.slice_input(i)) for i in range(config["batch"])])
        x = image.letterbox.to_model(x).to(device)

        def run():
            with (
                torch.inference_mode(),
                torch.autocast(
                    device.type, segmenter.autocast, enabled=segmenter.autocast is not None
                ),
            ):
                return model(x, token_threshold=config["tau"])

        kept = float(run().keep.float().mean())
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times = []
        for _ in range(config["repeats"]):
            sync()
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
        return {"slices_per_s": config["batch"] / float(np.median(times)), "kept": kept}
    if device.type == "cuda":  # warm-up: CUDA context and kernels are not the volume's cost
        segmenter.segment(segmenter.prepare(volume[:2], axis=0))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = rss_mib("VmRSS")
    start = time.perf_counter()
    result = segmenter.segment(segmenter.prepare(volume, axis=0), token_threshold=config["tau"])
    seconds = time.perf_counter() - start  # end to end: normalise, run, labels on the host
    out = {
        "seconds": seconds,
        "slices": result.stats.slices,
        "kept": result.stats.fraction("kept_tokens"),
        "input_mib": volume.nbytes / 2**20,
        "labels_mib": result.labels.nbytes / 2**20,
        "host_peak_above_mib": rss_mib("VmHWM") - before,
        "gflops": result.stats.gflops,
        "labels_digest": int(np.bincount(result.labels.ravel(), minlength=4)[1:].sum()),
    }
    if device.type == "cuda":
        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if config.get("compare_float32"):
        reference = Segmenter(model, device=device, batch_size=config["batch"], precision="float32")
        expected = reference.segment(
            reference.prepare(volume, axis=0), token_threshold=config["tau"]
        ).labels
        out["changed_fraction"] = float(np.mean(result.labels != expected))
    return out


def matmul_rate() -> float:
    """GFLOP/s of a float32 2048 x 2048 matrix product on the CPU: what the model's largest
    operations could reach at best on these threads (median of 10)."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    times = []
    for _ in range(12):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / float(np.median(times[2:])) / 1e9


def measure(config: dict) -> dict:
    return run_worker(__file__, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--devices", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--quick", action="store_true", help="smaller CPU volumes (a smoke test)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch

    devices = (args.devices or ("cpu,cuda" if torch.cuda.is_available() else "cpu")).split(",")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    torch.set_num_threads(args.threads)
    print(f"{describe()}, torch {torch.__version__}, CUDA: {gpu}")
    print(f"float32 2048 x 2048 matrix product on the CPU: {matmul_rate():.0f} GFLOP/s\n")
    base = {"threads": args.threads, "precision": "auto", "repeats": 10}
    cpu_volume = [40, 256, 256] if args.quick else [300, 512, 512]
    volumes = {"cpu": [cpu_volume], "cuda": [[200, 256, 256], [300, 512, 512]]}
    batches = {"cpu": 8, "cuda": 64}

    print("## Volumes, end to end\n")
    print(
        "| device | volume (z, y, x) int16 | batch | token threshold | kept tokens | "
        "slices/s | s per volume | time vs unpruned | model GFLOP/s | "
        "host peak above input (MiB) | GPU peak (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for device in devices:
        for shape in volumes[device]:
            unpruned = None
            for tau in (1.0, 0.9):
                config = {**base, "kind": "volume", "device": device, "shape": shape}
                config.update(batch=batches[device], tau=tau)
                m = measure(config)
                unpruned = unpruned or m["seconds"]
                print(
                    f"| {device} | {' x '.join(map(str, shape))} | {config['batch']} | {tau} | "
                    f"{100 * m['kept']:.0f} % | {m['slices'] / m['seconds']:.1f} | "
                    f"{m['seconds']:.2f} | {m['seconds'] / unpruned:.2f} | "
                    f"{(m['gflops'] or float('nan')) / m['seconds']:.0f} | "
                    f"{m['host_peak_above_mib']:.0f} | {m.get('gpu_peak_mib', float('nan')):.0f} |"
                )
    print("\n## Model only (a batch already on the device)\n")
    print("| device | batch (middle slices) | token threshold | kept tokens | slices/s |")
    print("|---|---|---|---|---|")
    for device in devices:
        for tau in (1.0, 0.9):
            config = {**base, "kind": "model", "device": device, "shape": [64, 256, 256]}
            config.update(batch=batches[device], tau=tau, repeats=3 if device == "cpu" else 20)
            m = measure(config)
            print(
                f"| {device} | {config['batch']} | {tau} | {100 * m['kept']:.0f} % | "
                f"{m['slices_per_s']:.1f} |"
            )
    print("\n## Reduced precision against float32 (labels that change)\n")
    print("| device | precision | volume | changed voxels |")
    print("|---|---|---|---|")
    checks = [
        ("cuda", "float16", [200, 256, 256]),
        ("cpu", "bfloat16", [24, 256, 256]),
        ("cpu", "float16", [6, 256, 256]),
    ]
    checks = [check for check in checks if check[0] in devices]
    for device, precision, shape in checks:
        config = {**base, "kind": "volume", "device": device, "shape": shape, "tau": 0.9}
        config.update(batch=batches[device], precision=precision, compare_float32=True)
        m = measure(config)
        print(
            f"| {device} | {precision} | {' x '.join(map(str, shape))} | "
            f"{100 * m['changed_fraction']:.3f} % |"
        )


if __name__ == "__main__":
    main()
