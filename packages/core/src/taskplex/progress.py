"""A progress bar on standard error, for ``taskplex map`` and ``Executor.map(progress=True)``.

Drawn with tqdm, which taskplex depends on. Updates may come from any thread (futures' callbacks
run in the executor's callback thread): a lock keeps the count and the closing in one order, so a
callback that comes after the bar was completed and closed changes nothing.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

__all__ = ["ProgressBar"]


class ProgressBar:
    """Counts finished calls toward ``total`` (None: unknown); silent when not ``shown``."""

    def __init__(self, total: int | None, *, shown: bool, description: str | None = None) -> None:
        self._bar: Any = None
        self._lock = threading.Lock()
        if shown:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, unit="task", desc=description, file=sys.stderr, dynamic_ncols=True
            )

    @staticmethod
    def on_a_terminal() -> bool:
        """Whether standard error is a terminal (where a bar belongs by default)."""
        return sys.stderr.isatty()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self, finished: int | None = None) -> None:
        """Close the bar; with ``finished``, first show at least that many finished.

        The caller may have seen the last calls finish before their callbacks counted them; the
        callbacks that run after this change nothing.
        """
        with self._lock:
            if self._bar is not None:
                if finished is not None and finished > self._bar.n:
                    self._bar.update(finished - self._bar.n)
                self._bar.close()
                self._bar = None

    def advance(self, count: int = 1) -> None:
        with self._lock:
            if self._bar is not None and count:
                self._bar.update(count)

    def show_failed(self, failed: int) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.set_postfix(failed=failed, refresh=False)

    def note(self, message: str) -> None:
        """Print a line on standard error without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)
