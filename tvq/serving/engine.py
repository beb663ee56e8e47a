"""The scheduler of `tvq serve` (docs/DESIGN.md section 13): the model runs on one worker
thread, in rounds. Each round the requests that can start leave the bounded queue
(tvq.serving.jobs: first come first served, 429 when full), each holding its rows (its
n) until it ends, so --batch-rows bounds the started requests and --queue-size the
others; a request's prompts join the running batch one after another (continuous
batching, tvq.serving.running), a long prompt read a chunk per round; then one call of
the compiled loop advances every running row. Text goes back to the event loop as it
is sampled, with its tokens' log-probs. Requests with a session start from, and leave
behind, its state (tvq.serving.sessions), one at a time per session. A request's own
failure (its session's state not saved) is answered to it alone; a failed call of the
loop, to every request in it.

The jobs, their queue and the typed events of their answers are tvq/serving/jobs.py.
Over 300 lines because starting, reading, joining and ending requests all share the
worker's state (the running batch, the prompts being read, the rows held); the batch
itself is tvq/serving/running.py.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time

import jax
import numpy as np

from tvq.batching import BatchItem
from tvq.decoding import Piece, Sample
from tvq.errors import StateError
from tvq.files import warm
from tvq.runtime.context import Context, chunk_len, require_tokenizer, score_ids
from tvq.runtime.model import Model
from tvq.runtime.state_cache import PromptScores, StateCache
from tvq.serving.answers import (
    choice_end,
    logprobs_json,
    logprobs_piece,
    usage_json,
)
from tvq.serving.jobs import ChoiceEnd, ChoiceText, Failed, Finished, Job, JobQueue
from tvq.serving.memory import Releaser, resident_bytes
from tvq.serving.protocol import (
    MAX_LOGPROBS,
    ApiError,
    ServerSettings,
    api_error,
    id_array,
)
from tvq.serving.running import RunningBatch
from tvq.serving.sessions import Sessions
from tvq.text.rows import TextRows

ANCHOR = 32  # a scored prompt's state is also kept at its last multiple of this many tokens
SCORED_KEPT = 64  # scored prompts whose ids a new one is compared with


class Engine:
    """The model behind the server: one worker thread starts the waiting requests whose
    rows are free, oldest first, and runs them together."""

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
        self.started: list[_Answer] = []  # oldest first; each holds its rows until it ends
        self.joining: collections.deque[_Answer] = collections.deque()  # next prompt, next round
        self.prefilling: collections.deque[_Prefill] = collections.deque()
        self.running = RunningBatch(model, self.alternatives, settings.max_batch_rows)
        self.decode_credit = 0.0  # seconds the running rows may decode before the next chunk
        # the state after each prompt and completion, so no text is read twice, and the
        # sessions' (pinned); the ids of the last scored prompts, whose common prefix with
        # a new one is kept too
        self.cache = StateCache(settings.cache_bytes, settings.cache_dir,
                                settings.cache_dir_bytes)  # fmt: skip
        self.sessions = Sessions(base or model, settings.max_sessions, settings.session_dir,
                                 self.cache)  # fmt: skip
        self.scored: collections.deque[np.ndarray] = collections.deque(maxlen=SCORED_KEPT)
        self.jobs = JobQueue(settings.queue_size)
        self.fresh = Context.start(model, 1)  # the start of a document, made once
        # requests started, most at once, prompt tokens in all and those the cache held
        self.stats = {"requests": 0, "largest_batch": 0, "prompt_tokens": 0, "cached_tokens": 0}
        self.releaser = Releaser()  # freed memory back to the system (tvq/serving/memory.py)
        self.worker = threading.Thread(target=self._work, name="tvq-model", daemon=True)
        self.worker.start()

    def warm_up(self, rows: tuple[int, ...] = (1, 2, 4)) -> None:
        """Compiles, before serving, what every request runs besides its prompt: the
        sampling loop, the batch's resizes and a row's writing, at these slot counts
        (at most --batch-rows; a larger one compiles once, when first needed, and is kept
        in the compilation cache)."""
        self.running.warm_up(sorted({min(n, self.settings.max_batch_rows) for n in rows}))

    def memory(self) -> dict:
        """Where the server's memory is, in bytes: resident (the process), arrays (every
        live device array: the state cache's and the sessions' contexts, the running
        batch, the parameters), cache (the state cache's entries as counted against
        --cache-bytes), rows (the running batch's slots); and programs (compiled
        programs held)."""
        arrays = sum(a.nbytes for a in jax.live_arrays())
        info = self.cache.info()
        return {"resident": resident_bytes(), "arrays": arrays,
                "cache": info["memory_bytes"] + info["pinned_bytes"],
                "rows": len(self.running.slots), "programs": warm.programs_held()}  # fmt: skip

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.close()
        self.worker.join()

    def _work(self) -> None:
        """The scheduler. Each round: the requests that can start leave the queue (the
        worker waits for one while nothing runs); each request's next prompt joins the
        running batch, or is read a chunk per round if it is long; then one call of the
        compiled loop advances every running row, or a chunk of a long prompt is read."""
        while True:
            idle = not self.started
            free = self.settings.max_batch_rows - sum(a.job.request.n for a in self.started)
            taken = self.jobs.take(free, self.sessions.busy(), wait=idle)
            if taken is None and idle:
                return
            for job in taken or []:
                self._start(job)
            while self.joining:
                self._join(self.joining.popleft())
            self._advance()

    def _advance(self) -> None:
        """Decoding and reading long prompts share the time: after a prompt chunk that
        took d seconds the running rows decode for d seconds before the next chunk, so a
        short request that arrives meanwhile is done within about one chunk's time, and a
        long prompt still gets half the model."""
        if self.running.rows and (self.decode_credit > 0 or not self.prefilling):
            started = time.perf_counter()
            self.stats["largest_batch"] = max(self.stats["largest_batch"],
                                              len(self.running.entries))  # fmt: skip
            self._guarded([e.owner for e in self.running.entries], self._step)
            self.decode_credit -= time.perf_counter() - started
        elif self.prefilling:
            started = time.perf_counter()
            self._read_chunk()
            self.decode_credit = time.perf_counter() - started

    def _start(self, job: Job) -> None:
        """A request leaves the queue: it holds its rows (and its session) from now on."""
        answer = _Answer(job, shared=_common_prefix(job.request.prompts))
        self.started.append(answer)
        self.stats["requests"] += 1
        if job.request.session is not None:
            self.sessions.claim(job.request.session)
        self.joining.append(answer)

    def _end(self, answer: _Answer, event: Finished | Failed | None = None) -> None:
        """A request ends (with its last event; none when its client left): its rows and
        its session are free."""
        if answer not in self.started:  # ended already
            return
        self.started.remove(answer)
        self.releaser.maybe()
        if answer.job.request.session is not None:
            self.sessions.release(answer.job.request.session)
        if event is not None:
            answer.job.send(event)

    def _join(self, answer: _Answer) -> None:
        """The request's next prompt joins the running batch, or is read a chunk per
        round first if it is long."""
        if answer.job.cancelled.is_set():
            self._end(answer)
        elif len(answer.job.request.prompts[answer.prompt]) > self.prefill_chunk:
            self.prefilling.append(_Prefill(answer))
        else:
            self._guarded([answer], lambda: self._admit(answer, _Prefill(answer)))

    def _step(self) -> None:
        """One call of the running batch; each entry's new pieces go to its client."""
        for entry in self.running.entries:
            if entry.owner.job.cancelled.is_set():
                self.running.cancel(entry)
        self.running.step()
        for entry in self.running.entries:
            entry.owner.out.send(entry.rows.drain())

    def _guarded(self, answers: list[_Answer], work) -> None:
        """work(); an error is answered to these requests (and, if the running batch
        holds one of them, to every request in it: it starts anew), never raised."""
        try:
            work()
        except Exception as e:  # noqa: BLE001  (answered, never raised)
            error = api_error(e)
            for answer in answers:
                self._end(answer, Failed(error))
            if any(entry.owner not in self.started for entry in self.running.entries):
                for entry in self.running.entries:
                    self._end(entry.owner, Failed(error))
                self.running = RunningBatch(self.model, self.alternatives,
                                            self.settings.max_batch_rows)  # fmt: skip

    def _begin(self, prefill: _Prefill) -> None:
        """Where a prompt's reading starts: its session's context (unless there is none
        or the prompt starts a document), else the longest prefix of its ids the state
        cache holds (with its scores, for echo with logprobs), else the start of a
        document."""
        answer = prefill.answer
        r, p = answer.job.request, answer.prompt
        if r.session is not None and not r.fresh[p]:
            prefill.context = self._session(r.session)
        prefill.keep, prefill.started = prefill.context is None, True
        echo = r.echo and r.logprobs is not None
        if prefill.keep:
            ids = r.prompts[p]
            if echo:
                n, context, scores = self.cache.longest_scored(self.model, ids, self.alternatives)
                prefill.scores = scores
                prefill.mark = max([_shared(ids, seen) for seen in self.scored], default=0)
                self.scored.append(np.asarray(ids, np.int32))
            else:
                n, context = self.cache.longest(self.model, ids)
            prefill.context, prefill.read = context, n
            answer.cached_tokens += n
            self.stats["cached_tokens"] += n
        if echo and prefill.scores is None:
            empty = np.zeros([0, self.alternatives])
            prefill.scores = PromptScores(np.zeros([0]), empty, empty.astype(np.int32))

    def _read(self, prefill: _Prefill, end: int) -> None:
        """Reads the prompt's ids up to `end` (their scores too, for echo with logprobs);
        read from the start of a document, the state is kept in the cache after each
        piece, with the scores where a piece ends at `end`, at the prompt's common prefix
        with the request's other prompts (which read it from there), at its common prefix
        with a scored prompt read before (`prefill.mark`: lm-evaluation-harness sends each
        continuation of a context as a request of its own, so the next one reads from the
        context's end), or, when a scored prompt is read to its end, at its last multiple
        of ANCHOR tokens."""
        answer = prefill.answer
        ids = answer.job.request.prompts[answer.prompt]
        marks = {end, answer.shared, prefill.mark}
        if prefill.scores is not None and end == len(ids):
            marks.add(end // ANCHOR * ANCHOR)
        stops = sorted(m for m in marks if prefill.read < m <= end)
        for stop in stops:
            if stop <= prefill.read:
                continue
            echo = prefill.scores is not None
            # every prompt is read with its alternatives, kept only for echo: one compiled
            # program per piece size, not two (each holds ~25 MB, RESULTS section 18), for
            # ~5% more time reading
            result, prefill.context = score_ids(
                self.model, ids[prefill.read : stop], prefill.context, top_k=self.alternatives
            )
            if echo:
                prefill.scores = prefill.scores.joined(PromptScores(
                    result.log_probs[0], result.top_log_probs[0], result.top_ids[0]))  # fmt: skip
            prefill.read = stop
            if prefill.keep:
                final = stop in marks
                self.cache.put(self.model, ids[:stop], prefill.context,
                               prefill.scores if final else None)  # fmt: skip

    def _read_chunk(self) -> None:
        """One prefill chunk of the oldest long prompt; it joins the batch once it is read."""
        prefill = self.prefilling[0]
        answer = prefill.answer
        ids = answer.job.request.prompts[answer.prompt]
        if answer.job.cancelled.is_set():
            self.prefilling.popleft()
            self._end(answer)
            return
        try:
            if not prefill.started:  # its session's context, read when its turn came
                self._begin(prefill)
            whole = len(ids) - len(ids) % self.model.block_len  # what generate scores first
            if whole - prefill.read > self.prefill_chunk:
                self._read(prefill, prefill.read + self.prefill_chunk)
                return
        except Exception as e:  # noqa: BLE001  (answered, never raised)
            self.prefilling.popleft()
            self._end(answer, Failed(api_error(e)))
            return
        self.prefilling.popleft()
        self._guarded([answer], lambda: self._admit(answer, prefill))

    def _admit(self, answer: _Answer, prefill: _Prefill) -> None:
        """The request's prompt joins the running batch: the rest of it is read (whole
        blocks as generate() reads them; all of it, with its scores, for echo with
        logprobs) from where its reading stands, its rows are added; _prompt_done
        follows when they end."""
        r, p = answer.job.request, answer.prompt
        ids = id_array(r.prompts[p])
        if not prefill.started:
            self._begin(prefill)
        echoing = prefill.scores is not None
        whole = len(ids) - len(ids) % self.model.block_len
        self._read(prefill, len(ids) if echoing else max(whole, prefill.read))
        echoed = None
        if echoing:
            k, scores = r.logprobs or 0, prefill.scores  # found self.alternatives deep
            echoed = (r.prompts[p], scores.log_probs, scores.top_log_probs[:, :k],
                      scores.top_ids[:, :k], r.fresh[p])  # fmt: skip
        answer.out = _Choices(answer.job, self.tokenizer, p * r.n, r.prompt_texts[p], echoed)
        context, tail = prefill.context, ids[prefill.read :]
        request = BatchItem(ids, r.max_tokens, r.seed, r.n, r.stop, r.sampler, r.logprobs or 0,
                            r.ignore_eos, r.constraint)  # fmt: skip
        rows = TextRows(self.tokenizer, [r.stop] * r.n, [r.ignore_eos] * r.n,
                        [r.logprobs or 0] * r.n)  # fmt: skip
        after_prompt = None  # where a session's sampled tokens continue from
        if r.session is not None:
            after_prompt = context or self.fresh
            if len(tail):
                after_prompt = self._after(tail, after_prompt)

        def done(samples: list[Sample]) -> None:
            if prefill.keep and r.n == 1 and samples[0].ids:  # made if a prompt continues it
                start, rest = context or self.fresh, [*tail, *samples[0].ids]
                self.cache.put_later(
                    self.model, [*r.prompts[p], *samples[0].ids], lambda: self._after(rest, start)
                )
            self._prompt_done(answer, rows, len(ids), echoed, after_prompt)

        self.running.admit(request, context, tail, rows, done, answer)

    def _prompt_done(self, answer: _Answer, rows: TextRows, prompt_tokens: int, echoed,
                     after_prompt: Context | None) -> None:  # fmt: skip
        """A prompt's rows all ended: its last pieces go out, a session keeps the state
        after every token sampled, the choices end, and the request's next prompt joins
        at the next round, or it ends. An error here (a session's state not saved: a full
        disk) ends this request alone."""
        job, p, samples = answer.job, answer.prompt, rows.samples
        r = job.request
        if job.cancelled.is_set():
            self._end(answer)
            return
        try:
            answer.out.send(rows.drain())
            if r.session is not None:
                after = self._after(samples[0].ids, after_prompt)
                if self._store(r.session, after):
                    answer.held = {"session_tokens": int(after.tokens)}  # an extension
            for row, sample in enumerate(samples):
                job.send(ChoiceEnd(p * r.n + row, choice_end(self.tokenizer, r, sample, echoed,
                                                             r.prompt_texts[p])))  # fmt: skip
        except Exception as e:  # noqa: BLE001  (answered, never raised)
            self._end(answer, Failed(api_error(e)))
            return
        answer.prompt_tokens += prompt_tokens + r.fresh[p]
        self.stats["prompt_tokens"] += prompt_tokens
        answer.completion_tokens += sum(len(s.ids) for s in samples)
        answer.prompt += 1
        if answer.prompt < len(r.prompts):
            self.joining.append(answer)
        else:
            usage = usage_json(answer.prompt_tokens, answer.completion_tokens,
                               answer.cached_tokens)  # fmt: skip
            self._end(answer, Finished(usage | answer.held))

    def _after(self, ids, context: Context) -> Context:
        """The context after reading ids from `context`, read as prompts are (with their
        alternatives: the same compiled programs)."""
        return score_ids(self.model, ids, context, top_k=self.alternatives)[1]

    def _store(self, name: str, context: Context) -> bool:
        """Stores a session's context after its request (False: it was deleted while
        the request ran); a state file that cannot be written is a 500 naming it."""
        try:
            return self.sessions.put(name, context)
        except OSError as e:
            raise ApiError(500, f"session {name}: its state could not be saved: "
                           f"{e.strerror or e}", "session", "server_error") from None  # fmt: skip

    def _session(self, name: str) -> Context | None:
        """The session's context (None: a new session); 409 if its state file is bad."""
        try:
            return self.sessions.get(name)
        except StateError as e:
            raise ApiError(409, f"session {name}: {e}", "session", "session_error") from None


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


@dataclasses.dataclass(eq=False)  # a request is itself: compared by identity
class _Answer:
    """A started request: its job, the prompt of it that runs (or is read, or joins
    next), where that prompt's pieces go, and its usage so far. It holds its rows (its
    n) from its start to its end."""

    job: Job
    prompt: int = 0
    out: _Choices | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the state cache held
    held: dict = dataclasses.field(default_factory=dict)  # session_tokens, an extension
    shared: int = 0  # its prompts' common prefix (several prompts: read once, then kept)


@dataclasses.dataclass
class _Prefill:
    """A prompt being read (a long one a chunk at a time): its request, the context after
    its first `read` tokens (None: the start of a document) and, for echo with
    logprobs, their scores; keep: it is read from the start of a document, so the state
    cache keeps what is read."""

    answer: _Answer
    context: Context | None = None
    read: int = 0
    scores: PromptScores | None = None
    keep: bool = False
    mark: int = 0  # its common prefix with a scored prompt read before: kept too
    started: bool = False  # where its reading starts is found (when its turn comes)


def _common_prefix(prompts: list[list[int]]) -> int:
    """How many first tokens all the prompts share (0 for one prompt): lm-evaluation-
    harness sends one context with each of its continuations."""
    if len(prompts) < 2:
        return 0
    first = np.asarray(prompts[0], np.int32)
    return min(_shared(other, first) for other in prompts[1:])


def _shared(ids, seen: np.ndarray) -> int:
    """How many first tokens ids shares with seen."""
    n = min(len(ids), len(seen))
    differ = np.flatnonzero(np.asarray(ids[:n], np.int32) != seen[:n])
    return int(differ[0]) if len(differ) else n
