"""Our APFormer against the authors' release, interleaved in one process; prints a Markdown table.

    git clone https://github.com/xianlin7/APFormer /some/where/APFormer
    pip install einops opencv-python-headless      # the release's imports
    python benchmarks/bench_release.py --release /some/where/APFormer [--threads 2]

Both models get the same state_dict (the conformance vector's: 1 channel, 9 classes) and the
same 256 x 256 brain slice from tests/data. The release's inference model
(`APFormer_Model_Test`) puts one buffer on CUDA at construction; on a machine without a GPU
that call is made a no-op while it is built, nothing else of it is changed. Each round times
every row once, one after the other, so a drift of the machine touches all rows alike; the
table gives medians and, per row, the median of the per-round ratios to the release unpruned.
The release prunes with one threshold for the whole batch (a known defect, spec section 6), so
it runs at batch 1 only; our rows include batch 8.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import VECTOR, load_vector
from napari_apformer.hardware import describe

# Fractions of kept tokens to time besides "all": the thresholds are chosen on the slice.
KEPT_FRACTIONS = (0.5, 0.3)


@contextlib.contextmanager
def cuda_calls_stay_on_cpu() -> Iterator[None]:
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def release_model(folder: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    sys.path.insert(0, str(folder))
    from models.P2UtransR import APFormer_Model_Test  # the authors' code, from --release

    with cuda_calls_stay_on_cpu():
        model = APFormer_Model_Test(n_channels=1, n_classes=9, imgsize=256)
    model.load_state_dict(state)
    return model.eval()


def set_release_threshold(model: torch.nn.Module, tau: float) -> None:
    for layer in model.trans4.transformer.layers:
        layer[0].fn.neg_thresh = tau


def threshold_for(model, x: torch.Tensor, fraction: float) -> float:
    """A token threshold that keeps about `fraction` of the slice's tokens."""
    with torch.inference_mode():
        background = torch.softmax(model.encode(x).token_logits, dim=1)[0, 0].flatten()
    ordered = torch.sort(background).values
    return float(ordered[int(fraction * ordered.numel())])


def ms(run: Callable[[], object], calls: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return 1000 * (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--release", type=Path, required=True, help="a clone of the release")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours, image = load_vector()
    with np.load(VECTOR) as z:
        state = {k[3:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("sd/")}
    release = release_model(args.release, state)
    x = torch.from_numpy(image)[None, None]
    x8 = x.repeat(8, 1, 1, 1)

    thresholds = {"all": 1.0} | {
        f"{100 * f:.0f} %": threshold_for(ours, x, f) for f in KEPT_FRACTIONS
    }
    with torch.inference_mode():  # the two agree before anything is timed
        set_release_threshold(release, 1.0)
        difference = (release(x)[0] - ours(x, token_threshold=1.0).logits).abs().max()
    rows: dict[str, Callable[[], object]] = {}
    for name, tau in thresholds.items():
        with torch.inference_mode():
            kept = int(ours(x, token_threshold=tau).keep.sum())
        label = f"{name} ({100 * kept / ours.tokens:.0f} % kept, tau {tau:.4f})"

        def run_release(tau: float = tau) -> None:
            set_release_threshold(release, tau)
            release(x)

        rows[f"release, batch 1, {label}"] = run_release
        rows[f"ours, batch 1, {label}"] = lambda tau=tau: ours(x, token_threshold=tau)
        rows[f"ours, batch 8, {label}"] = lambda tau=tau: ours(x8, token_threshold=tau)

    per_slice = {name: 8 if "batch 8" in name else 1 for name in rows}
    times: dict[str, list[float]] = {name: [] for name in rows}
    with torch.inference_mode():
        for run in rows.values():  # warm-up
            run()
        for _ in range(args.rounds):
            for name, run in rows.items():
                times[name].append(ms(run) / per_slice[name])

    reference = times[next(iter(rows))]
    print(f"{describe()}, torch {torch.__version__}, {args.rounds} rounds")
    print(f"largest |logit difference| ours vs release, nothing pruned: {float(difference):.2e}\n")
    print("| model, batch, kept tokens | ms per slice (median) | vs release unpruned |")
    print("|---|---|---|")
    for name, values in times.items():
        ratio = statistics.median(v / r for v, r in zip(values, reference, strict=True))
        print(f"| {name} | {statistics.median(values):.0f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
