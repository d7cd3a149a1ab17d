"""A small progress bar for long work: redrawn in place on a terminal (stderr), else a few plain
lines on stdout, so that stderr holds nothing but errors."""
import sys
import time


class Progress:
    """Counts `total` units of work under a label; call `advance()` per unit and `close()` at the end."""

    def __init__(self, total, label, stream=None, width=30):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or (sys.stderr if sys.stderr.isatty() else sys.stdout)
        self.tty = self.stream.isatty()
        self.done = 0
        self.start = time.perf_counter()
        self._last_tenth = -1

    def advance(self, n=1, note=""):
        """Record `n` more units done; `note` is shown after the counts."""
        self.done += n
        if self.tty:
            filled = int(self.width * self.done / max(self.total, 1))
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} "
                              f"{self._elapsed()} {note}\x1b[K")
            self.stream.flush()
            return
        tenth = 10 * self.done // max(self.total, 1)
        if tenth != self._last_tenth:
            self._last_tenth = tenth
            self.stream.write(f"{self.label}: {self.done}/{self.total} {self._elapsed()} {note}\n")
            self.stream.flush()

    def close(self):
        """End the bar's line on a terminal."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _elapsed(self):
        return f"{time.perf_counter() - self.start:.0f}s"
