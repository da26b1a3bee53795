"""Stage timings and the progress bar of :func:`~.reconstruct.run_pipeline`."""

from __future__ import annotations

import logging
import time

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

STAGES = ("read images", "model", "keypoints", "matching", "tracks", "bundle adjustment", "write")


class Stages:
    """Stage timings and the tqdm progress bar; without the bar, one INFO line per finished stage (a log
    file of a long run shows where it is)."""

    def __init__(self, total: int, progress: bool, log: bool = True) -> None:
        self.timings: dict[str, float] = {}
        self.bar = tqdm(total=total, desc="reconstruct", unit="stage", disable=not progress, leave=False)
        self.progress = progress
        self.log = log and not progress
        self.begin = self.last = time.perf_counter()

    def start(self, description: str) -> None:
        self.bar.set_description(description)
        self.last = time.perf_counter()

    def add_stage(self, description: str) -> None:
        """Start a stage that was not counted in the total."""
        self.bar.total += 1
        self.bar.refresh()
        self.start(description)

    def done(self, name: str) -> None:
        self.timings[name] = time.perf_counter() - self.last
        self.bar.update(1)
        if self.progress:
            self.bar.set_postfix_str(f"{name} {self.timings[name]:.1f}s")
        elif self.log:
            logger.info("%s: %.1f s (%.1f s in all)", name, self.timings[name], self.elapsed())

    def elapsed(self) -> float:
        return time.perf_counter() - self.begin

    def close(self) -> None:
        self.bar.close()
