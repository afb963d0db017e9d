"""What a person watching a run sees: a progress bar per epoch, one accuracy line
per peer after each epoch, and the best peer at the end. A ``Callback``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from tqdm import tqdm

from .callbacks import Callback, StepTerms
from .metrics import epoch_values

if TYPE_CHECKING:
    from .coordinator import Cohort, RunResult
    from .metrics import MetricsLog


class ConsoleReporter(Callback):
    """Prints progress through ``log`` (lines) and tqdm on stderr (the bar).

    ``COHORT_PROGRESS=0`` turns the bar off (tests, log files).
    """

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.bar: tqdm | None = None

    def on_start(self, cohort: Cohort, first_epoch: int) -> None:
        self.names = cohort.config.cohort.model_names
        self.epochs = cohort.config.optim.epochs
        self.steps_per_epoch = cohort.describe["steps_per_epoch"]

    def on_step(self, step: int, terms: StepTerms) -> None:
        epoch, within = divmod(step, self.steps_per_epoch)
        if self.bar is not None and (epoch != self.bar_epoch or within < self.bar.n):  # a recovery rewound
            self.close_bar()
        if self.bar is None:
            self.bar_epoch = epoch
            self.bar = tqdm(
                total=self.steps_per_epoch,
                initial=within,
                desc=f"epoch {epoch + 1}/{self.epochs}",
                unit="step",
                file=sys.stderr,
                mininterval=0.5 if sys.stderr.isatty() else 30,
                leave=False,
                disable=os.environ.get("COHORT_PROGRESS", "1") == "0",
            )
        self.bar.set_postfix(loss=" ".join(f"{t['loss']:.3f}" for t in terms), refresh=False)
        self.bar.update(1)
        if within == self.steps_per_epoch - 1:
            self.close_bar()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_epoch(self, epoch: int, metrics: MetricsLog) -> None:
        self.close_bar()
        latest = epoch_values(metrics.frame(), epoch)
        split = "test"  # reported every epoch; selection reads val when there is one
        for j, name in enumerate(self.names):
            self.log(
                f"epoch {epoch}/{self.epochs}  peer {j} ({name})  train loss {latest[(j, 'train', 'loss')]:.4f}  "
                f"{split} top-1 {100 * latest[(j, split, 'top1')]:.2f}%  "
                f"top-5 {100 * latest[(j, split, 'top5')]:.2f}%  loss {latest[(j, split, 'loss')]:.4f}"
            )
        self.log(
            f"epoch {epoch}/{self.epochs}  ensemble {split} top-1 {100 * latest[(None, split, 'ensemble_top1')]:.2f}%"
        )

    def on_finish(self, result: RunResult) -> None:
        name = self.names[result.best_peer]
        self.log(
            f"best peer: {result.best_peer} ({name}, final-epoch {result.selected_on} top-1 "
            f"{100 * result.best_top1:.2f}%) -> {result.best_peer_path}"
        )
