"""Skipped samples and the one skip budget of planning, the run and the TFDS build.

The rule (one place): with k samples skipped of n seen, stop with `DataError` when
n >= min_samples and k > max_rate * n. Callers check after recording skips (the run
and the build after each skip, planning once over the whole plan); the message names
the counts, the rate, the last skip and the counts by reason.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from llamavid_jax.data import DataError, SampleError


@dataclasses.dataclass(frozen=True)
class Skip:
  """A skipped sample: where it is and why."""

  index: int
  id: str
  reason: str
  field: str
  detail: str
  path: str | None = None

  @classmethod
  def of(cls, sample, err: SampleError) -> Skip:
    """The skip of `sample` (a `sources.RawSample`) for `err`."""
    return cls(sample.index, sample.id, err.reason, err.field, err.detail, err.path or sample.path)

  def message(self) -> str:
    file = f" (file {self.path})" if self.path else ""
    return (f"sample {self.id!r} (index {self.index}) field {self.field!r}{file}: "
            f"{self.reason}: {self.detail}")


class SkipBudget:
  """Skips by reason against samples seen, bounded by `max_rate` once `min_samples` were seen.

  Attributes:
    seen: samples seen (attempted) so far.
    counts: skips by reason.
    last: the last recorded skip (None before any, and after `set_state`).
  """

  def __init__(self, max_rate: float, min_samples: int):
    self.max_rate, self.min_samples = max_rate, min_samples
    self.seen = 0
    self.counts: collections.Counter[str] = collections.Counter()
    self.last: Skip | None = None

  @property
  def skipped(self) -> int:
    return sum(self.counts.values())

  def record(self, skip: Skip) -> None:
    """Counts `skip` (its sample must be counted in `seen` too)."""
    self.counts[skip.reason] += 1
    self.last = skip

  def exceeded(self) -> bool:
    """The rule: seen >= min_samples and skipped > max_rate * seen."""
    k = self.skipped
    return k > 0 and self.seen >= self.min_samples and k > self.max_rate * self.seen

  def check(self, where: str = "") -> None:
    """Raises `DataError` when the bound is passed; `where` (e.g. " while planning")
    follows the rate in the message."""
    if not self.exceeded():
      return
    k, n = self.skipped, self.seen
    last = f"; last: {self.last.message()}" if self.last is not None else ""
    raise DataError(f"skip rate {k}/{n} = {k / n:.3f} exceeds max_skip_rate {self.max_rate}{where}"
                    f"{last}; by reason: {dict(self.counts)}")

  def get_state(self) -> dict[str, Any]:
    return {"seen": self.seen, "skips": dict(self.counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    self.seen = int(state["seen"])
    self.counts = collections.Counter({k: int(v) for k, v in state["skips"].items()})
    self.last = None
