"""Run one benchmark configuration in a fresh Python process (the script's own --worker mode),
so that process-wide state (allocator, peak memory, caches) starts clean for every row."""

from __future__ import annotations

import json
import subprocess
import sys


def run_worker(script: str, config: dict) -> dict:
    """`python script --worker CONFIG_JSON`; its last stdout line is the JSON result."""
    done = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(config)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"worker failed for {config}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
