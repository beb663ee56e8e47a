"""The scheduler of `tvq serve` (docs/DESIGN.md section 13): the model runs on one worker
thread that takes jobs from a bounded queue, first come first served (a full queue
answers 429), in rounds: waiting requests of one prompt join the running batch
(continuous batching, tvq.serving.running), a long prompt is read a chunk per round,
a request of several prompts runs alone, and each round one call of the compiled loop
advances every running row. Text goes back to the event loop as it is sampled, with its
tokens' log-probs. Requests with a session start from, and leave behind, its state
(tvq.serving.sessions), one at a time per session.

The jobs, their queue and the typed events of their answers are tvq/serving/jobs.py.
Over 300 lines because admission, long prompts, sessions and the requests
that run alone all share the worker's state (the running batch, the prompts being read,
the busy sessions); the batch itself is tvq/serving/running.py.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time

import numpy as np

from tvq.decoding import BatchItem, Generation, Piece, Sample, generate, stream_generate
from tvq.errors import StateError
from tvq.runtime.context import Context, chunk_len, require_tokenizer, score_ids
from tvq.runtime.model import Model
from tvq.serving.jobs import ChoiceEnd, ChoiceText, Failed, Finished, Job, JobQueue
from tvq.serving.protocol import (
    MAX_LOGPROBS,
    ApiError,
    CompletionRequest,
    ServerSettings,
    api_error,
    choice_end,
    id_array,
    logprobs_json,
    logprobs_piece,
    usage_json,
)
from tvq.serving.running import RunningBatch
from tvq.serving.sessions import Sessions
from tvq.text.rows import TextRows


class Engine:
    """The model behind the server: one worker thread takes the oldest waiting request
    and every waiting request that can share its batch, and runs them together."""

    def __init__(self, model: Model, settings: ServerSettings, base: Model | None = None
                 ) -> None:  # fmt: skip
        """base: the model as loaded, whose fingerprint names the state files (model
        may compute in another dtype: the same parameters)."""
        self.model, self.settings = model, settings
        self.tokenizer = require_tokenizer(model)
        # every request's loop finds this many alternatives per token, whatever its own
        # logprobs: one compiled program serves them all
        self.alternatives = min(MAX_LOGPROBS, model.config.n_vocab)
        # A prompt longer than this is read a chunk at a time, the queue looked at between
        # chunks, so a long prompt never stalls the requests that arrive behind it. One
        # chunk of score_ids: the pieces generate() would cut, so the numbers are the same.
        self.prefill_chunk = chunk_len(model.block_len)
        self.prefilling: collections.deque[_Prefill] = collections.deque()
        self.running = RunningBatch(model, self.alternatives)
        self.busy: set[str] = set()  # sessions with a request running (one at a time each)
        self.decode_credit = 0.0  # seconds the running rows may decode before the next chunk
        self.sessions = Sessions(base or model, settings.max_sessions, settings.session_dir)
        self.jobs = JobQueue(settings.queue_size)
        # served requests, the model's runs (batches and lone requests), the largest batch
        self.stats = {"requests": 0, "runs": 0, "largest_batch": 0}
        self.worker = threading.Thread(target=self._work, name="tvq-model", daemon=True)
        self.worker.start()

    def warm_up(self, rows: tuple[int, ...] = (1, 2, 4)) -> None:
        """Compiles, before serving, the one sampling loop every request runs, at these
        row counts (the running batch is padded to a power of two; a larger one compiles
        once, when first needed, and is kept in the compilation cache)."""
        for n in rows:
            if n <= self.settings.max_batch_rows:
                generate(self.model, [], max_tokens=1, num_samples=n,
                         alternatives=self.alternatives)  # fmt: skip
                self.running.warm_up(n)

    def submit(self, job: Job) -> None:
        r = job.request
        job.long_prompt = len(r.prompts) == 1 and len(r.prompts[0]) > self.prefill_chunk
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.close()
        self.worker.join()

    def _work(self) -> None:
        """The scheduler. Each round: takes the waiting requests (without waiting while
        anything runs) that fit the free rows; a request of one prompt (a session's too)
        joins the running batch (continuous batching: tvq.serving.running), a long prompt
        is read a chunk per round, any other request runs alone; then one call of the
        compiled loop advances every running row."""
        waiting: collections.deque[Job] = collections.deque()
        while True:
            idle = not self.prefilling and not self.running.rows and not waiting
            free = self.settings.max_batch_rows - self.running.rows
            batch = self.jobs.take(max(free, 1), wait=idle) if free > 0 else []
            if batch is None and idle:
                return
            waiting.extend(job for job in batch or [] if not job.cancelled.is_set())
            held: collections.deque[Job] = collections.deque()
            while waiting:  # oldest first; one that must wait does not hold back the rest
                job = waiting.popleft()
                if not self._fits(job) or job.request.session in self.busy:
                    held.append(job)
                    continue
                if job.request.session is not None:
                    self.busy.add(job.request.session)
                if job.long_prompt:  # read a chunk at a time, between the others
                    self.prefilling.append(_Prefill(job, None, started=False))
                elif job.batch_key() is None:
                    self._run_alone(job)
                else:
                    self._guarded([job], lambda job=job: self._admit(job, None))
            waiting = held
            # Decoding and reading long prompts share the time: after a prompt chunk
            # that took d seconds the running rows decode for d seconds before the next
            # chunk, so a short request that arrives meanwhile is done within about one
            # chunk's time, and a long prompt still gets half the model.
            if self.running.rows and (self.decode_credit > 0 or not self.prefilling):
                started = time.perf_counter()
                self._guarded([e.job for e in self.running.entries], self._step)
                self.decode_credit -= time.perf_counter() - started
                self.stats["largest_batch"] = max(self.stats["largest_batch"],
                                                  len(self.running.entries))  # fmt: skip
            elif self.prefilling:
                started = time.perf_counter()
                self._read_chunk()
                self.decode_credit = time.perf_counter() - started

    def _step(self) -> None:
        """One call of the running batch; each entry's new pieces go to its client."""
        for entry in self.running.entries:
            if entry.job.cancelled.is_set():
                self.running.cancel(entry)
        self.running.step()
        for entry in self.running.entries:
            entry.job.out.send(entry.rows.drain())

    def _fits(self, job: Job) -> bool:
        """Whether a request's rows fit beside the running ones (any fits an empty batch)."""
        rows = self.running.rows
        return not rows or rows + job.request.n <= self.settings.max_batch_rows

    def _guarded(self, jobs: list[Job], work) -> None:
        """work(); an error is answered to the jobs, never raised."""
        try:
            work()
        except Exception as e:  # noqa: BLE001  (answered, never raised)
            error = api_error(e)
            for job in jobs:
                job.send(Failed(error))
                self.busy.discard(job.request.session)
            if self.running.entries and any(e.job in jobs for e in self.running.entries):
                for entry in self.running.entries:  # the batch failed: answer all of it
                    entry.job.send(Failed(error))
                    self.busy.discard(entry.job.request.session)
                self.running = RunningBatch(self.model, self.alternatives)  # start clean

    def _start_context(self, job: Job) -> Context | None:
        r = job.request
        return self._session(r.session) if r.session is not None and not r.fresh[0] else None

    def _read_chunk(self) -> None:
        """One prefill chunk of the oldest long prompt; its request runs once it is read."""
        prefill = self.prefilling[0]
        job, ids = prefill.job, prefill.job.request.prompts[0]
        if job.cancelled.is_set():
            self.prefilling.popleft()
            self.busy.discard(job.request.session)
            return
        try:
            if not prefill.started:  # its session's context, read when its turn came
                prefill.context, prefill.started = self._start_context(job), True
            whole = len(ids) - len(ids) % self.model.block_len  # what generate scores first
            if whole - prefill.read > self.prefill_chunk:
                piece = ids[prefill.read : prefill.read + self.prefill_chunk]
                _, prefill.context = score_ids(self.model, piece, prefill.context)
                prefill.read += len(piece)
                return
        except Exception as e:  # noqa: BLE001  (answered, never raised)
            self.prefilling.popleft()
            self.busy.discard(job.request.session)
            job.send(Failed(api_error(e)))
            return
        self.prefilling.popleft()
        self._guarded([job], lambda: self._admit(job, prefill))

    def _run_alone(self, job: Job) -> None:
        """Runs a request of several prompts alone."""
        self.stats["requests"] += 1
        self.stats["runs"] += 1
        self._guarded([job], lambda: self._run(job))

    def _admit(self, job: Job, prefill: _Prefill | None) -> None:
        """A request of one prompt joins the running batch: the rest of its prompt is
        read (whole blocks as generate() reads them) from its session's context or the
        start of a document, its rows are added; a session's context after the request
        is stored when it ends (the state after every token it sampled)."""
        self.stats["requests"] += 1
        r = job.request
        ids = id_array(r.prompts[0])
        start = self._start_context(job) if prefill is None else None
        context, read = (prefill.context, prefill.read) if prefill is not None else (start, 0)
        if prefill is not None and r.echo:
            start = self._start_context(job)
        echoed = self._prompt_logprobs(r.prompts[0], start, r, r.fresh[0]) \
            if r.echo and r.logprobs is not None else None  # fmt: skip
        job.out = _Choices(job, self.tokenizer, 0, r.prompt_texts[0], echoed)
        whole = len(ids) - len(ids) % self.model.block_len
        if whole > read:
            _, context = score_ids(self.model, ids[read:whole], context)
        request = BatchItem(ids, r.max_tokens, r.seed, r.n, r.stop, r.sampler, r.logprobs or 0,
                            r.ignore_eos)  # fmt: skip
        rows = TextRows(self.tokenizer, [r.stop] * r.n, [r.ignore_eos] * r.n,
                        [r.logprobs or 0] * r.n)  # fmt: skip

        after_prompt = None
        if r.session is not None:  # where the sampled tokens continue from, for the session
            after_prompt = context or Context.start(self.model, 1)
            if len(ids) > whole:
                _, after_prompt = score_ids(self.model, ids[whole:], after_prompt)

        def done(samples: list[Sample]) -> None:
            job.out.send(rows.drain())
            held = {}
            if r.session is not None:
                self.busy.discard(r.session)
                if not job.cancelled.is_set():
                    _, after = score_ids(self.model, samples[0].ids, after_prompt)
                    self.sessions.put(r.session, after)
                    held = {"session_tokens": int(after.tokens)}  # an extension
            for row, sample in enumerate(samples):
                job.send(ChoiceEnd(row, choice_end(self.tokenizer, r, sample, echoed,
                                                   r.prompt_texts[0])))  # fmt: skip
            completion = sum(len(s.ids) for s in samples)
            job.send(Finished(usage_json(len(ids) + r.fresh[0], completion) | held))

        self.running.admit(request, context, ids[whole:], rows, done, job)

    def _run(self, job: Job) -> None:
        """A request of several prompts, prompt by prompt, each a stream_generate."""
        r = job.request
        prompt_tokens, completion_tokens, held = 0, 0, {}
        for p, (ids, text) in enumerate(zip(r.prompts, r.prompt_texts, strict=True)):
            # a leading end-of-document marker starts a document, a session's too
            fresh = r.fresh[p]
            start = self._session(r.session) if r.session is not None and not fresh else None
            echoed = self._prompt_logprobs(ids, start, r, fresh) \
                if r.echo and r.logprobs is not None else None  # fmt: skip
            out = _Choices(job, self.tokenizer, p * r.n, text, echoed)
            result = self._generate(job, ids, start, out)
            if result is None:  # the client went away
                return
            prompt_tokens += len(ids) + fresh
            completion_tokens += sum(len(s.ids) for s in result.samples)
            if r.session is not None:
                self.sessions.put(r.session, result.context)
                held = {"session_tokens": int(result.context.tokens)}  # an extension
            for row, sample in enumerate(result.samples):
                job.send(ChoiceEnd(p * r.n + row, choice_end(self.tokenizer, r, sample, echoed,
                                                             text)))  # fmt: skip
        job.send(Finished(usage_json(prompt_tokens, completion_tokens) | held))

    def _generate(self, job: Job, ids, start: Context | None, out: _Choices
                  ) -> Generation | None:  # fmt: skip
        """One prompt of a request run alone, its pieces streamed to the client; None
        when the client went away (the stream is closed there: nothing more runs)."""
        r = job.request
        with stream_generate(
            self.model, ids, max_tokens=r.max_tokens, sampler=r.sampler, seed=r.seed,
            num_samples=r.n, stop=r.stop, context=start, logprobs=r.logprobs or 0,
            ignore_eos=r.ignore_eos, alternatives=self.alternatives,
        ) as stream:  # fmt: skip
            for event in stream:
                if job.cancelled.is_set():
                    return None
                if isinstance(event, Piece):
                    out.send([event])
                else:
                    return event
        return None

    def _session(self, name: str) -> Context | None:
        """The session's context (None: a new session); 409 if its state file is bad."""
        try:
            return self.sessions.get(name)
        except StateError as e:
            raise ApiError(409, f"session {name}: {e}", "session", "session_error") from None

    def _prompt_logprobs(self, ids: list[int], start: Context | None, r: CompletionRequest,
                         fresh: bool):  # fmt: skip
        """The prompt's tokens with their log-probs and top log-probs (echo), and whether
        a document-start marker came before them."""
        if not ids:
            return [], np.zeros([0]), np.zeros([0, 0]), np.zeros([0, 0], np.int32), fresh
        k = r.logprobs or 0  # found self.alternatives deep, as in sampling: one program
        scored, _ = score_ids(self.model, ids, start, keep_log_probs=True, top_k=self.alternatives)
        tops = scored.top_log_probs[0, :, :k], scored.top_ids[0, :, :k]
        return ids, scored.log_probs[0], *tops, fresh


class _Choices:
    """A prompt's choices on their way back: text as it is sampled, each piece with its
    tokens' log-probs when the request asks for them (OpenAI's streamed shape; the pieces
    join to the whole choice's), text offsets counted from the prompt's start. With echo
    the prompt goes first, with its own log-probs."""

    def __init__(self, job: Job, tokenizer, first: int, prompt_text: str, echoed) -> None:
        r = job.request
        self.job, self.tokenizer, self.first = job, tokenizer, first
        self.offsets = [0 if r.echo else len(prompt_text)] * r.n
        self.logprobs = r.logprobs is not None
        if r.echo:
            for row in range(r.n):
                part = None
                if echoed is not None:
                    part = logprobs_json(tokenizer, Sample(), echoed, 0)
                self.offsets[row] = len(prompt_text)
                job.send(ChoiceText(first + row, prompt_text, part))

    def send(self, pieces: list[Piece]) -> None:
        for piece in pieces:
            part = None
            if self.logprobs:
                part, self.offsets[piece.sample] = logprobs_piece(
                    self.tokenizer, piece, self.offsets[piece.sample]
                )
            self.job.send(ChoiceText(self.first + piece.sample, piece.text, part))


@dataclasses.dataclass
class _Prefill:
    """A long prompt being read a chunk at a time: its job, the context after its first
    `read` tokens (None: nothing read yet, from the start or the session's context)."""

    job: Job
    context: Context | None
    read: int = 0
    started: bool = True  # its start context is read (a session's, when its turn comes)
