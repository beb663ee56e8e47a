"""The progress of preparing a corpus (`tvq prepare`, and `tvq train` on text): a bar per
phase on a terminal (bytes, MB/s, ETA), one line per phase otherwise, on stderr."""

from __future__ import annotations

from tvqcli.app import stderr

PHASES = {"scan": "scanning", "tokenizer": "training the tokenizer", "tokenize": "tokenizing",
          "index": "indexing"}  # fmt: skip


class PrepareProgress:
    """Preparation progress on stderr: on a terminal a bar per phase (bytes, MB/s, ETA),
    otherwise one line per phase when it ends."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def __enter__(self):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.live = stderr.is_terminal and not self.quiet
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                            TransferSpeedColumn(), TimeRemainingColumn(), console=stderr,
                            disable=not self.live, transient=True)  # fmt: skip
        self.tasks: dict[str, int] = {}
        return self.report

    def report(self, event) -> None:
        if self.quiet:
            return
        if event.phase in ("found", "done"):  # the end: the training's bar may follow
            self.bar.stop()
            line = (f"using the prepared data in {event.detail} (tokenized before: nothing to do)"
                    if event.phase == "found" else f"prepared {event.detail}")  # fmt: skip
            stderr.print(line, highlight=False, soft_wrap=True)
            return
        task = self.tasks.get(event.phase)
        if task is None:
            self.bar.start()
            task = self.bar.add_task(PHASES.get(event.phase, event.phase),
                                     total=event.total or None)  # fmt: skip
            self.tasks[event.phase] = task
        self.bar.update(task, completed=event.done, total=event.total or None)
        if event.finished:
            self.bar.remove_task(task)
            self.bar.console.print(f"{event.phase}: {event.detail} in {event.seconds:.1f} s",
                                   highlight=False, soft_wrap=True)  # fmt: skip

    def __exit__(self, *exc):
        self.bar.stop()
        return False
