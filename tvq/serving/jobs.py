"""Requests on their way through `tvq serve` (docs/DESIGN.md section 13): a `Job` (a
checked request, its client's event queue and its cancellation), the bounded queue of
the jobs not started (`JobQueue`, first come first served, 429 when full), and the
typed events of an answer, sent from the model's thread to the event loop: `ChoiceText`
pieces, a `ChoiceEnd` per choice, then `Finished` (the usage) or `Failed`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading

from tvq.serving.protocol import ApiError, CompletionRequest


@dataclasses.dataclass(frozen=True)
class ChoiceText:
    """A piece of a choice's text, with its tokens' log-probs when asked for."""

    choice: int
    text: str
    logprobs: dict | None = None


@dataclasses.dataclass(frozen=True)
class ChoiceEnd:
    """A choice ended: its finish_reason and its whole logprobs (choice_end's dict)."""

    choice: int
    end: dict


@dataclasses.dataclass(frozen=True)
class Finished:
    """Every choice ended: the request's usage."""

    usage: dict


@dataclasses.dataclass(frozen=True)
class Failed:
    """The request failed: its answer."""

    error: ApiError


JobEvent = ChoiceText | ChoiceEnd | Finished | Failed


@dataclasses.dataclass
class Job:
    """One request on its way through the worker; its events go back to the event loop,
    each a JobEvent, Finished or Failed last. Its client going away sets `cancelled`."""

    request: CompletionRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def send(self, event: JobEvent) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class JobQueue:
    """The jobs not started, oldest first, at most `limit` (429 beyond). The worker
    takes a job only when it starts it (`take`), so every job that waits is here and
    counted, whatever it waits for; a job whose client went away is dropped."""

    def __init__(self, limit: int) -> None:
        self.limit, self.jobs, self.closed = limit, collections.deque(), False
        self.ready = threading.Condition()

    def put(self, job: Job) -> None:
        with self.ready:
            if len(self.jobs) >= self.limit:  # a job whose client left gives its place up
                self.jobs = collections.deque(j for j in self.jobs if not j.cancelled.is_set())
            if len(self.jobs) >= self.limit:
                raise ApiError(429, f"the server is busy: {self.limit} requests are waiting; "
                               "try again shortly", kind="rate_limit_error")  # fmt: skip
            self.jobs.append(job)
            self.ready.notify()

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()

    def take(self, free_rows: int, busy: set[str], wait: bool = True) -> list[Job] | None:
        """The jobs that start now, oldest first, off the queue: a job whose session is
        busy (a request of it runs) waits without holding back the others; any other
        starts if its rows (its n) are free, and once one does not find them free no
        younger job takes rows before it, so none is overtaken forever. None once
        closed; with wait, waits for a job while there is none."""
        with self.ready:
            while wait and not self.jobs and not self.closed:
                self.ready.wait()
            if self.closed:
                return None
            taken, kept, busy = [], collections.deque(), set(busy)
            for job in self.jobs:
                session, rows = job.request.session, job.request.n
                if job.cancelled.is_set():
                    continue
                if session in busy:  # waits for its session, holding back no one
                    kept.append(job)
                elif rows > free_rows:  # waits for rows, and the younger ones behind it
                    kept.append(job)
                    free_rows = 0
                else:
                    taken.append(job)
                    free_rows -= rows
                    if session is not None:
                        busy.add(session)
            self.jobs = kept
            return taken
