"""Training step time on the CPU: what keeping freed memory and the SSA term cost.

    python benchmarks/bench_train_step.py [--threads 2] [--steps 8] [--batch-size 4]

A step is augmented-size input (B, 1, 256, 256) through the model at token threshold 0.9,
the spec's losses, backward and an AdamW update, on random images (step time does not depend
on the pixels, only on how many tokens are kept: at initialisation the pruning head keeps
about half). Every configuration runs in a fresh process, since the allocator setting is
process-wide; the first two steps are warm-up and not counted. Prints a Markdown table with
the median step time and the kernel's share of the CPU time (page faults show up there).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from fresh_process import run_worker


def worker(config: dict) -> dict:
    """Time `steps` training steps in this (fresh) process."""
    if config["keep_freed_memory"]:  # for the rest of this process
        from napari_apformer.allocator import freed_memory_kept

        freed_memory_kept().__enter__()
    import torch

    from napari_apformer.model.apformer import APFormer

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    model = APFormer(1, 4).train()
    optimizer = torch.optim.AdamW(model.parameter_groups(1e-4), lr=1e-4)
    batch = config["batch_size"]
    images = torch.rand(batch, 1, 256, 256)
    masks = torch.randint(0, 4, (batch, 256, 256))
    times, cpu = [], []
    for k in range(config["steps"] + 2):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        # As `apformer train` asks: step 1 with ssa_every 2 leaves the SSA term out.
        loss = model.training_losses(
            images, masks, step=1, ssa_every=1 if config["ssa"] else 2, token_threshold=0.9
        )["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if k >= 2:
            after = resource.getrusage(resource.RUSAGE_SELF)
            times.append(time.perf_counter() - started)
            cpu.append((after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime))
    user, system = sum(c[0] for c in cpu), sum(c[1] for c in cpu)
    return {
        "median_s": statistics.median(times),
        "max_s": max(times),
        "kernel_share": system / max(user + system, 1e-9),
    }


def measure(config: dict) -> dict:
    return run_worker(__file__, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    print(f"threads {args.threads}, batch {args.batch_size}, {args.steps} steps per row\n")
    print("| SSA term | freed memory | median step (s) | slowest step (s) | kernel CPU share |")
    print("|---|---|---|---|---|")
    for ssa in (False, True):
        for keep in (False, True):
            config = {
                "threads": args.threads,
                "steps": args.steps if not ssa else max(2, args.steps // 4),
                "batch_size": args.batch_size,
                "ssa": ssa,
                "keep_freed_memory": keep,
            }
            row = measure(config)
            print(
                f"| {'on' if ssa else 'off'} | {'kept' if keep else 'returned'} "
                f"| {row['median_s']:.2f} | {row['max_s']:.2f} "
                f"| {100 * row['kernel_share']:.0f} % |",
                flush=True,
            )


if __name__ == "__main__":
    main()
