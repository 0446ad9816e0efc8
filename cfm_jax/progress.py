"""Training progress: a tqdm bar on a terminal; elsewhere (CI, a SLURM job, `make demo > log`) one
plain line every `interval` seconds and at the end, instead of hundreds of carriage-return updates."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class PlainProgress:
    """The subset of tqdm's interface the trainer uses, printing `desc: step S/T (P %), k=v, R steps/s`."""

    def __init__(self, total: int, initial: int, desc: str, interval: float = 30.0, stream=None):
        self.total, self.n, self.desc, self.interval = total, initial, desc, interval
        self.stream = stream or sys.stderr
        self.postfix: dict = {}
        self._t0 = self._last = time.monotonic()
        self._n0 = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._print(now)

    def set_postfix(self, **values) -> None:
        self.postfix.update(values)

    def close(self) -> None:
        self._print(time.monotonic())

    def _print(self, now: float) -> None:
        self._last = now
        rate = (self.n - self._n0) / max(now - self._t0, 1e-9)
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f} %){extra}, "
              f"{rate:.2f} steps/s", file=self.stream, flush=True)


def progress_bar(total: int, initial: int, desc: str, enabled: bool, interval: float = 30.0):
    """tqdm on a terminal, PlainProgress otherwise; disabled -> a tqdm that prints nothing."""
    if enabled and not sys.stderr.isatty():
        return PlainProgress(total, initial, desc, interval)
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)
