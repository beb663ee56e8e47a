"""Requests on their way through `tvq serve` (docs/DESIGN.md section 13): a `Job` (a
checked request, its client's event queue and its cancellation), the bounded queue the
engine takes jobs from (`JobQueue`, first come first served, 429 when full), and the
typed events of an answer, sent from the model's thread to the event loop: `ChoiceText`
pieces, a `ChoiceEnd` per choice, then `Finished` (the usage) or `Failed`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from typing import Any

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
    each a JobEvent, Finished or Failed last."""

    request: CompletionRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def send(self, event: JobEvent) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def batch_key(self) -> tuple | None:
        """Requests with equal keys are taken from the queue together; None: this one is
        taken alone (it has several prompts, or a prompt long enough to be read in
        chunks). A session's request joins the running batch as any other does.
        Sampler settings, penalties, log-probs and ignore_eos are values of the one
        compiled loop: any mix shares."""
        r = self.request
        if len(r.prompts) != 1 or self.long_prompt:
            return None
        return (r.session,)

    # set by the engine: the prompt is longer than one prefill chunk (Engine.prefill_chunk)
    long_prompt: bool = False
    out: Any = None  # where its pieces go (the engine's _Choices)


class JobQueue:
    """Jobs waiting for the model, oldest first, at most `limit`. take() returns the
    oldest job with the waiting jobs that can share its batch."""

    def __init__(self, limit: int) -> None:
        self.limit, self.jobs, self.closed = limit, collections.deque(), False
        self.ready = threading.Condition()

    def put(self, job: Job) -> None:
        with self.ready:
            if len(self.jobs) >= self.limit:
                raise ApiError(429, f"the server is busy: {self.limit} requests are waiting; "
                               "try again shortly", kind="rate_limit_error")  # fmt: skip
            self.jobs.append(job)
            self.ready.notify()

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()

    def take(self, max_rows: int, wait: bool = True) -> list[Job] | None:
        """The oldest job and, when it can be batched, every waiting job with the same
        batch key, up to max_rows rows in all; None once closed. Without wait: [] when
        nothing is waiting."""
        with self.ready:
            while wait and not self.jobs and not self.closed:
                self.ready.wait()
            if self.closed:
                return None
            if not self.jobs:
                return []
            first = self.jobs.popleft()
            key = first.batch_key()
            if key is None:
                return [first]
            batch, rows, kept = [first], first.request.n, collections.deque()
            while self.jobs:
                job = self.jobs.popleft()
                if job.batch_key() == key and rows + job.request.n <= max_rows:
                    batch.append(job)
                    rows += job.request.n
                else:
                    kept.append(job)
            self.jobs = kept
            return batch
