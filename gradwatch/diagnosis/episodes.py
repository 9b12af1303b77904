"""Spike episodes and what they point at: one bad batch, or a learning rate that is too high.

Flagged spikes (of the gradient norm or of the loss) are grouped into episodes: spikes at most
:data:`GAP` steps apart. An episode points at the **learning rate** only when the evidence says the
optimisation itself was going unstable:

* the healthy gradient norm was rising before it (``rise`` >= :data:`RISE`), or
* its spikes grow (its largest is :data:`GROW` times its first, and comes later), or
* it lasts more than one step (or is still open, and the steps before its first spike were
  rising) and the learning rate rose :data:`LR_RISE` times or more in the 20 steps before it (a
  warm-up or a schedule step).

Otherwise it points at the **data**: a spike out of steady gradients that is its episode's largest
is one bad batch (an outlier, a corrupt record, a unit error) and at most the aftermath of the
step it caused. A single-step spike under a warm-up is still the data's: a learning rate too high
does not make one step 1000 times larger and the next one normal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

from gradwatch.detect.health_report import SpikeRecord
from gradwatch.detect.incidents import GAP

__all__ = ["GAP", "GROW", "LR_RISE", "OPEN_CARRIED", "RISE", "Episode", "episodes"]

RISE = 2.0
"""A healthy gradient norm this many times higher than 20 healthy steps before was growing."""
GROW = 2.0
"""An episode whose largest spike is this many times its first (and later) grows."""
OPEN_CARRIED = 0.8
"""Under a rising learning rate, an open episode's first spike whose step made less than this
share of its rise is taken for the start of growth."""
LR_RISE = 1.5
"""A learning rate this many times higher than 20 steps before changed recently."""


class Episode(NamedTuple):
    """Spikes close together, and what they point at.

    Attributes:
        records: The spikes, in step order.
        cause: ``"learning_rate"`` or ``"data"``.
        reason: The evidence for ``cause``, as a clause ready to join a sentence (for the data,
            it describes the episode: ``"a single spike out of steady gradients"``).
    """

    records: tuple[SpikeRecord, ...]
    cause: Literal["data", "learning_rate"]
    reason: str

    @property
    def first(self) -> SpikeRecord:
        return self.records[0]

    @property
    def steps(self) -> str:
        """``"step 30"`` or ``"steps 31-39"``."""
        first, last = self.records[0].step, self.records[-1].step
        return f"step {first}" if first == last else f"steps {first}-{last}"


def episodes(
    records: Sequence[SpikeRecord],
    *,
    gap: int = GAP,
    what: str = "gradient norm",
    latest: int | None = None,
) -> list[Episode]:
    """Group spikes (in step order) into episodes and tell what each points at.

    Args:
        records: The spikes, in step order.
        gap: Spikes at most this many steps apart belong to one episode.
        what: What spiked, for the reasons (``"gradient norm"``, ``"loss"``).
        latest: The latest step seen: an episode ending there is still open (a live alert
            cannot know yet whether the next step falls back).
    """
    groups: list[list[SpikeRecord]] = []
    for record in records:
        if groups and record.step - groups[-1][-1].step <= gap:
            groups[-1].append(record)
        else:
            groups.append([record])
    return [_classify(tuple(g), what, latest is not None and g[-1].step >= latest) for g in groups]


def _classify(records: tuple[SpikeRecord, ...], what: str, open_: bool) -> Episode:
    first = records[0]
    peak = max(records, key=lambda r: r.value)
    rise, lr_change = first.rise, first.lr_change
    if rise is not None and rise >= RISE:
        reason = (
            f"the healthy gradient norm rose steadily ×{rise:.2g} over the 20 healthy steps "
            f"before step {first.step}"
        )
        return Episode(records, "learning_rate", reason)
    if peak.step > first.step and peak.value >= GROW * first.value:
        reason = (
            f"the {what} spikes grew from {first.value:.3g} at step {first.step} to "
            f"{peak.value:.3g} at step {peak.step}"
        )
        return Episode(records, "learning_rate", reason)
    # Under a rising learning rate, several spikes point at it; so does the first, while its
    # episode is open, when the steps before it were rising too.
    carried = first.carried if first.carried is not None else 1.0
    lasting = len(records) > 1 or (open_ and carried < OPEN_CARRIED)
    if lasting and lr_change is not None and lr_change >= LR_RISE:
        spikes = "spikes at steps" if len(records) > 1 else "spike at step"
        last = f"-{records[-1].step}" if len(records) > 1 else ""
        reason = (
            f"the learning rate rose ×{lr_change:.2g} in the 20 steps before the {spikes} "
            f"{first.step}{last}"
        )
        return Episode(records, "learning_rate", reason)
    steady = " out of steady gradients" if rise is not None else ""
    if len(records) == 1:
        return Episode(records, "data", f"a single spike{steady}")
    if peak is first:
        return Episode(records, "data", f"the largest spike first{steady}, then its aftermath")
    return Episode(records, "data", f"spikes that do not grow{',' if steady else ''}{steady}")
