"""What a run cost and what its model skipped: FLOPs actually spent, the model's counters
(kept tokens, ...) summed over slices, time."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunStats:
    """Totals over the slices of one run. counters: name -> [count, out of], with the labels
    the model declares (see SegmentationModel.counter_specs)."""

    slices: int = 0
    counters: dict[str, list[int]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    flops: int = 0  # what this run spent (cached work not counted again)
    flops_full: int = 0  # a plain pass per slice at these settings, nothing cached
    flops_unpruned: int = 0  # a plain pass per slice: nothing pruned, nothing cached
    encoder_cache_hits: int = 0
    seconds: float = 0.0
    device: str = "cpu"

    def add(self, name: str, count: int, total: int) -> None:
        pair = self.counters.setdefault(name, [0, 0])
        pair[0] += count
        pair[1] += total

    def fraction(self, name: str) -> float:
        count, total = self.counters.get(name, (0, 0))
        return count / total if total else 0.0

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def gflops_unpruned(self) -> float:
        return self.flops_unpruned / 1e9

    @property
    def ms_per_slice(self) -> float:
        return 1000 * self.seconds / self.slices if self.slices else 0.0

    def fractions_text(self) -> str:
        return ", ".join(
            f"{self.labels.get(name, name)} {100 * self.fraction(name):.1f} %"
            for name in self.counters
        )

    def summary(self) -> str:
        counted = self.fractions_text()
        return (
            f"{self.slices} slice(s) on {self.device}: "
            + (f"{counted}, " if counted else "")
            + f"{self.gflops:.1f} of {self.gflops_unpruned:.1f} GFLOP, "
            f"{self.ms_per_slice:.0f} ms per slice"
        )
