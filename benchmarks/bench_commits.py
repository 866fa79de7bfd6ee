"""Engine speed of two source trees, interleaved in one run; prints a Markdown table.

    git worktree add /tmp/old <commit>
    python benchmarks/bench_commits.py /tmp/old/src src [--rounds 4] [--threads 2]

Each round runs one fresh process per tree (their order alternating from round to round), so
a drift in the machine's load touches both alike. A process loads the conformance vector's
weights and brain slice (tests/data/), warms up, and times `Segmenter.segment` (the path the
widget and the CLI take): one slice, and a stack of 8 slices (one batch), unpruned
(token threshold 1.0) and at the threshold that keeps about half the tokens (0.9). Only the
engine API both trees share is used. Figures: median ms per slice over the rounds, and the
ratio new / old.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

VECTOR = Path(__file__).parents[1] / "tests/data/official_gray9_trimmed.npz"
CASES = [("1 slice", 1, 1.0), ("1 slice", 1, 0.9), ("8 slices", 8, 1.0), ("8 slices", 8, 0.9)]

SCRIPT = """
import json, statistics, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
from napari_apformer.engine.inference import Segmenter
from napari_apformer.model import load_model
with np.load(sys.argv[2]) as z:
    state = {k[3:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("sd/")}
    image = z["input"][0, 0].copy()
model = load_model(state)
repeats, cases = int(sys.argv[3]), json.loads(sys.argv[4])
out = []
for _, slices, tau in cases:
    data = image if slices == 1 else np.stack([image + 0.01 * k for k in range(slices)])
    segmenter = Segmenter(model, device="cpu", batch_size=8)
    prepared = segmenter.prepare(data)
    segmenter.segment(prepared, token_threshold=tau)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        segmenter.segment(prepared, token_threshold=tau)
        times.append(1000 * (time.perf_counter() - start) / slices)
    out.append(statistics.median(times))
print(json.dumps(out))
"""


def run_tree(src: Path, threads: int, repeats: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(threads), str(VECTOR), str(repeats), json.dumps(CASES)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="the src/ folder of the earlier tree")
    parser.add_argument("new", type=Path, help="the src/ folder of the tree to compare")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case and process")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    trees = {"old": args.old, "new": args.new}
    results: dict[str, list[list[float]]] = {"old": [], "new": []}
    for k in range(args.rounds):
        for name in ("old", "new") if k % 2 == 0 else ("new", "old"):
            results[name].append(run_tree(trees[name], args.threads, args.repeats))
    print(f"old: {args.old}; new: {args.new}; {args.rounds} rounds, {args.threads} threads\n")
    print("| input | token threshold | old ms per slice | new ms per slice | new / old |")
    print("|---|---|---|---|---|")
    for i, (what, _, tau) in enumerate(CASES):
        old = statistics.median(r[i] for r in results["old"])
        new = statistics.median(r[i] for r in results["new"])
        print(f"| {what} | {tau} | {old:.0f} | {new:.0f} | {new / old:.3f} |")


if __name__ == "__main__":
    main()
