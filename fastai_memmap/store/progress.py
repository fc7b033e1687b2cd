"""`Progress`: the one progress bar of the writers and converters (a fastprogress bar over a count).

fastprogress (a dependency of fastai) draws it in notebooks and terminals; this wrapper adds what
every caller needs: nothing at all when disabled or when the total is unknown (fastprogress would
print even then), counts clipped to the total, an idempotent `close`, and a newline when a console bar
ends (fastprogress leaves the cursor at the end of the bar line, so the next print was glued to it).
"""
import sys
from typing import Optional

__all__ = ["Progress"]


class Progress:
    """A bar over `total` steps (rows, documents, images or chunks: the caller's unit, named in `comment`).

    `on` is False when disabled (``progress=False``) or `total` is 0/None: then every method does
    nothing and fastprogress is not imported. `update(done)` takes the count done so far (not an
    increment), clipped to `total`; `close()` ends the bar early (after an error); reaching the total
    ends it too.
    """

    def __init__(self, total: Optional[int], on: bool, comment: str = ""):
        self.total, self.bar, self.done = total, None, 0
        self.on = bool(on and total)
        if self.on:
            from fastprogress.fastprogress import progress_bar
            self.bar = progress_bar(range(total))
            self.bar.comment = comment
            self.bar.update(0)

    def update(self, done: int) -> None:
        "Show `done` steps of `total` as done (clipped to `total`); reaching `total` ends the bar."
        if self.bar is not None:
            self.done = min(done, self.total)
            self.bar.update(self.done)
            if self.done >= self.total:
                self.close()

    def close(self) -> None:
        "End the bar where it is (idempotent); a console bar's line is ended with a newline."
        if self.bar is not None:
            bar, self.bar = self.bar, None
            if self.done < self.total:   # at the total, fastprogress has closed the bar itself
                bar.on_iter_end()
            from fastprogress.fastprogress import ConsoleProgressBar
            if isinstance(bar, ConsoleProgressBar) and bar.display:
                sys.stdout.write("\n")
                sys.stdout.flush()
