"""What a run cost and what its model skipped: FLOPs actually spent, the model's counters
(kept tokens, ...) summed over slices, time.

A family whose prediction reports no FLOPs (`Prediction.flops` None) leaves what the run
spent unknown: `flops_counted` is False, `gflops` None, and the texts say so (NOT_COUNTED)
instead of showing 0 GFLOP. The unpruned reference is torch's own count of a plain pass
(`SegmentationModel.reference_flops`), so it is known for every family."""

from __future__ import annotations

from dataclasses import dataclass, field

NOT_COUNTED = "FLOPs not counted by this family"


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
    # False once a slice came from a model that reports no FLOPs: `flops` and `flops_full`
    # are then unknown (not 0) for the whole run.
    flops_counted: bool = True
    encoder_cache_hits: int = 0
    seconds: float = 0.0
    device: str = "cpu"

    def add(self, name: str, count: int, total: int) -> None:
        pair = self.counters.setdefault(name, [0, 0])
        pair[0] += count
        pair[1] += total

    def add_flops(self, spent: int | None, full: int | None, unpruned: int) -> None:
        """One slice's FLOPs: spent and full None when its model counts none."""
        self.flops_unpruned += unpruned
        if spent is None or full is None:
            self.flops_counted = False
            return
        self.flops += spent
        self.flops_full += full

    def fraction(self, name: str) -> float:
        count, total = self.counters.get(name, (0, 0))
        return count / total if total else 0.0

    @property
    def gflops(self) -> float | None:
        """GFLOP spent by the run; None when the model does not count them."""
        return self.flops / 1e9 if self.flops_counted else None

    @property
    def gflops_full(self) -> float | None:
        """GFLOP of a plain pass per slice at the run's settings, summed; None when the
        model does not count them."""
        return self.flops_full / 1e9 if self.flops_counted else None

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

    def flops_text(self) -> str:
        """'1.2 of 4.3 GFLOP' (spent of unpruned), or NOT_COUNTED with the unpruned cost."""
        if self.gflops is None:
            return f"{NOT_COUNTED} (unpruned: {self.gflops_unpruned:.1f} GFLOP)"
        return f"{self.gflops:.1f} of {self.gflops_unpruned:.1f} GFLOP"

    def summary(self) -> str:
        counted = self.fractions_text()
        return (
            f"{self.slices} slice(s) on {self.device}: "
            + (f"{counted}, " if counted else "")
            + f"{self.flops_text()}, {self.ms_per_slice:.0f} ms per slice"
        )
