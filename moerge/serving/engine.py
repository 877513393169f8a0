"""The server's engine: one worker thread runs every completion with continuous batching.

Requests join the running batch at its next decode step and leave it when they are done
(:class:`~moerge.runtime.decode.DecodeBatch`): each is routed and prefilled when it joins (requests that arrive
together share the prefill), every row keeps its own routing, sampling and seed, and a row finishes at its own end
of text, stop string or ``max_tokens`` — a short request is never held up by a long one beyond the steps they share.
A request whose client left is dropped at the next step. Streamed and whole requests run in the same batch; a
streamed one gets its text as it is made (:class:`TextTail` never sends the start of a stop string), a whole one its
result at the end. The rows in the batch, and their prompts plus ``max_tokens`` together, are bounded
(``max_batch``, ``max_batch_tokens``); requests beyond wait in order.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from moerge.runtime.decode import DecodeBatch, Prefilled, Prompt, Row
from moerge.runtime.sampling import Pick, Sampling

if TYPE_CHECKING:  # pragma: no cover
    from moerge.serving.metrics import Metrics

__all__ = ["Cancelled", "Engine", "Job", "ServerConfig", "TextTail", "queued"]

T = TypeVar("T")


@dataclass
class ServerConfig:
    """How the server batches requests (rows at once, their prompt and completion tokens at once, how long an idle
    worker waits for more requests to prefill with the first), how many tokens a request gets when it does not say,
    the largest request body, how many expert uploads may wait to be added (more are refused) and how many finished
    ones it remembers, and the API key that changing the experts (or, with ``api_key_for_all``, any request) needs."""

    max_batch: int = 8
    batch_window: float = 0.02  # seconds an idle worker waits for more requests after the first
    max_batch_tokens: int = 65536  # rows × the longest prompt + max_tokens among them: the KV cache's most
    # columns (a request alone always runs)
    default_max_tokens: int = 128
    max_body_bytes: int = 4 << 20  # larger request bodies are refused (413)
    max_pending_uploads: int = 8
    upload_history: int = 100
    api_key: str | None = None  # required (Authorization: Bearer …) to upload or delete experts
    api_key_for_all: bool = False  # and for every other route as well
    admin: bool = True  # False: uploads and deletes are refused (403), e.g. when reachable from other machines
    # without a key


@dataclass
class Job:
    """One prompt to complete (``n`` choices); the result (or error) arrives in ``future``. A streamed job also gets
    each piece of text as it is made: ``on_piece(index, text, picks, finish)`` is called from the worker thread
    (``picks``: the tokens the piece ends, with their log-probabilities when asked; ``finish``: the choice's finish
    reason with its last piece, else ``None``)."""

    ids: list[int]  # the prompt's token ids
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    experts: dict[str, float] | None = None
    exclude: tuple[str, ...] = ()
    n: int = 1
    echo: bool = False  # the prompt's log-probabilities too (scoring a text)
    on_piece: Callable[[int, str, list[Pick], str | None], None] | None = None
    constraint: Callable[[], Any] | None = None  # structured output: makes each row's constraint
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """Give up the job (its client left): its rows leave the batch at the next step, and its future ends with
        :class:`Cancelled` (or is cancelled, if it had not started)."""
        self.cancelled.set()
        self.future.cancel()


def queued(items: queue.Queue[T], stop: threading.Event) -> Iterator[T]:
    """The items put in ``items``, as they come, until ``stop`` is set (looked at every 0.1 s while none comes):
    the loop of a worker thread."""
    while not stop.is_set():
        try:
            yield items.get(timeout=0.1)
        except queue.Empty:
            continue


class Cancelled(Exception):
    """What a job given up by its client ends with, once its rows have left the batch."""


class TextTail:
    """A row's text as its tokens come: what may be sent so far (never an incomplete character, nor an end of text
    that could be the start of a stop string), and whether a stop string or end token finished it."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str], ends: set[int]) -> None:
        """``decode``: token ids to text, special tokens left out (:meth:`Engine.decode`)."""
        self._decode, self.stop, self.ends = decode, [s for s in stop if s], ends
        self.ids: list[int] = []
        self.text = ""  # the text so far (cut at a stop string once met)
        self.sent = 0  # characters of it already given out
        self.finish: str | None = None
        self.counted = 0  # completion tokens: up to the one that ended the text
        self.pending: list[Pick] = []  # picks not yet given out with a piece
        self._prefix = self._read = 0  # incremental decoding: ids[_prefix:_read] were decoded into text already

    def _new_text(self) -> str:
        """The text the latest tokens add, once it is whole: the ids from the last settled point are decoded with
        the ones before them as context (a token's text can depend on its neighbours'), so text once made is never
        changed and each step decodes a few tokens, not all of them."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):  # nothing yet, or an incomplete character
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def add(self, pick: Pick) -> str:
        """Take the row's next token; the text that may now be given out (maybe empty)."""
        if self.finish is not None:
            return ""
        if pick.token in self.ends:
            self.finish = "stop"
            return self._release(len(self.text))
        self.ids.append(pick.token)
        self.pending.append(pick)
        self.counted = len(self.ids)
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        text = self.text + self._new_text()
        cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=None)
        if cut is not None:
            self.text, self.finish = text[:cut], "stop"
            return self._release(cut)
        self.text = text
        safe = len(text)
        for s in self.stop:  # hold back an end that may be the start of a stop string
            for k in range(min(len(s) - 1, safe - self.sent), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        return self._release(safe)

    def close(self, finish: str) -> str:
        """The row ended without an end token or stop string (``finish``: ``"length"``): all that is left."""
        if self.finish is None:
            self.finish = finish
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece

    def take_picks(self) -> list[Pick]:
        picks, self.pending = self.pending, []
        return picks


@dataclass
class _Choice:
    tail: TextTail
    picks: list[Pick] = field(default_factory=list)
    batch: int = 1  # the most rows this choice ran with


class Engine:
    """Runs jobs on the model in one worker thread with continuous batching (see the module's docstring)."""

    def __init__(self, model: Any, tokenizer: Any, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.model, self.tok, self.config, self.metrics = model, tokenizer, config, metrics
        vocab = tokenizer.get_vocab()
        self.ends = {tokenizer.eos_token_id, self.pad_id} | ({vocab["<|im_end|>"]} if "<|im_end|>" in vocab else set())
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # e.g. Llama 3's <|eot_id|>
        self.ends |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
        self.ends.discard(None)
        self.tok_lock = threading.Lock()
        self.queue: queue.Queue[Job] = queue.Queue()
        self.batches: collections.deque[int] = collections.deque(maxlen=10_000)  # rows of each step run
        self.batch = DecodeBatch(model, self.pad_id, len(tokenizer))
        self._waiting: collections.deque[Job] = collections.deque()
        self._choices: dict[int, _Choice] = {}  # id(row) -> its text so far
        self._jobs: dict[int, list[Row]] = {}  # id(job) -> its rows, while one of them is not done
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._loop, name="moerge-batcher", daemon=True)
        self._worker.start()

    @property
    def pad_id(self) -> int:
        tok = self.tok
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def close(self) -> None:
        """Stop the worker (jobs not finished are failed)."""
        self._stop.set()
        self._worker.join(timeout=30)

    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future gets the completion's result (see :meth:`_result`)."""
        if not self._worker.is_alive():
            raise RuntimeError("the server's engine has stopped")
        self.queue.put(job)
        return job.future

    def tokenize(self, text: str) -> list[int]:
        """``text``'s token ids (no special tokens added; the tokenizer is called by one thread at a time)."""
        with self.tok_lock:
            return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        """``ids``' text, as written (no clean-up of spaces), special tokens left out unless ``skip_special`` is
        false (the tokenizer is called by one thread at a time)."""
        with self.tok_lock:
            return self.tok.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    # --- the worker -------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._admit()
                    if len(self.batch):
                        self._step()
                except Exception as e:  # noqa: BLE001 - what failed outside a row (joining, leaving, a result)
                    self._reset(e)
        finally:
            for job in list(self._waiting) + [j for j in self._queued()]:
                _fail(job, RuntimeError("the server is shutting down"))
            for rows in self._jobs.values():
                _fail(rows[0].prompt.owner, RuntimeError("the server is shutting down"))
            for row in self.batch.rows:
                row.done = True
            self.batch.leave(self.batch.rows)

    def _reset(self, error: BaseException) -> None:
        """After a failure the batch cannot be trusted with: fail the jobs in it and start an empty one (the
        requests waiting to join are kept)."""
        for rows in list(self._jobs.values()):
            _fail(rows[0].prompt.owner, error)
        self._jobs.clear()
        self._choices.clear()
        self.batch = DecodeBatch(self.model, self.pad_id, self.batch.vocab)
        if self.metrics is not None:
            self.metrics.running.set(0)

    def _queued(self) -> list[Job]:
        jobs = []
        while True:
            try:
                jobs.append(self.queue.get_nowait())
            except queue.Empty:
                return jobs

    def _admit(self) -> None:
        """Take the jobs that fit into the batch (rows and tokens), in order, and prefill them together."""
        if not len(self.batch) and not self._waiting:
            try:  # idle: wait for a job, then briefly for more to prefill with it
                self._waiting.append(self.queue.get(timeout=0.1))
            except queue.Empty:
                return
            deadline = time.monotonic() + self.config.batch_window
            while sum(j.n for j in self._waiting) < self.config.max_batch:
                try:
                    self._waiting.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
        self._waiting.extend(self._queued())
        if not self.batch.open:
            return
        rows = len(self.batch)
        width = max((len(r.prompt.ids) + r.prompt.max_new for r in self.batch.rows), default=0)
        chosen: list[Job] = []
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled.is_set() or job.future.cancelled():
                self._waiting.popleft()
                continue
            wide = max(width, len(job.ids) + job.max_tokens)  # the cache is as wide as its longest row can get
            if (rows or chosen) and (rows + job.n > self.config.max_batch
                                     or (rows + job.n) * wide > self.config.max_batch_tokens):
                break
            self._waiting.popleft()
            if job.future.set_running_or_notify_cancel():
                chosen.append(job)
                rows, width = rows + job.n, wide
        if not chosen:
            return
        echo = [j for j in chosen if j.echo]
        plain = [j for j in chosen if not j.echo]
        for group in ([plain] if plain else []) + [[j] for j in echo]:  # prompt log-probabilities: all positions
            self._prefill(group)

    def _prefill(self, jobs: list[Job]) -> None:
        try:
            done = self.batch.prefill([self._prompt(j) for j in jobs])
        except BaseException as e:  # noqa: BLE001 - one request's failure is its own, not the others'
            if len(jobs) == 1:
                _fail(jobs[0], e)
                return
            for job in jobs:
                self._prefill([job])
            return
        if self.metrics is not None:
            now = time.monotonic()
            for job in jobs:
                self.metrics.first_token.observe(now - job.arrived)
        for row in done.rows:
            self._jobs.setdefault(id(row.prompt.owner), []).append(row)
            choice = self._choices[id(row)] = _Choice(TextTail(self.decode, row.prompt.owner.stop, self.ends))
            if row.picks:
                self._take(row, choice, row.picks[-1])
            else:
                self._end(row, choice, "length")
        self._join(done)

    def _join(self, done: Prefilled) -> None:
        self.batch.join(done)
        self._settle([r for r in done.rows if r.done])

    @staticmethod
    def _prompt(job: Job) -> Prompt:
        return Prompt(job.ids, job.sampling, job.max_tokens, job.n, job.experts, job.exclude, job.echo, owner=job,
                      constraint=job.constraint)

    def _step(self) -> None:
        for row in self.batch.rows:
            job = row.prompt.owner
            if job.cancelled.is_set() or job.future.done():  # its client left, or another of its rows failed
                row.done = True
        self._leave()
        if not len(self.batch):
            return
        try:
            rows = self.batch.step()
        except BaseException as e:  # noqa: BLE001 - a step's failure fails the rows in it, not the worker
            for row in self.batch.rows:
                row.done = True
                _fail(row.prompt.owner, e)
            self._leave()
            return
        self.batches.append(len(rows))
        if self.metrics is not None:
            self.metrics.rows.observe(len(rows))
            self.metrics.running.set(len(rows))
            self.metrics.waiting.set(len(self._waiting) + self.queue.qsize())
        for row in rows:
            choice = self._choices[id(row)]
            choice.batch = max(choice.batch, len(rows))
            self._take(row, choice, row.picks[-1])
        self._leave()

    def _take(self, row: Row, choice: _Choice, pick: Pick) -> None:
        """A row's new token: its text, and its end (an end token, a stop string, its max_tokens)."""
        if row.error is not None:
            _fail(row.prompt.owner, row.error)
            return
        tail = choice.tail
        piece = tail.add(pick)
        if tail.finish is None and row.budget_left <= 0:
            piece += tail.close("length")
        if tail.finish is not None:
            row.done = True
        self._send(row, choice, piece)

    def _send(self, row: Row, choice: _Choice, piece: str) -> None:
        """Give out the row's new ``piece`` of text (to a streamed job's ``on_piece``), with the picks it ends; the
        last one with the finish reason."""
        job = row.prompt.owner
        if piece or row.done:
            picks = choice.tail.take_picks()
            choice.picks.extend(picks)
            if job.on_piece is not None and not job.cancelled.is_set():
                job.on_piece(row.index, piece, picks, (choice.tail.finish or "length") if row.done else None)

    def _end(self, row: Row, choice: _Choice, finish: str) -> None:
        row.done = True
        self._send(row, choice, choice.tail.close(finish))

    def _leave(self) -> None:
        done = [r for r in self.batch.rows if r.done]
        self.batch.leave(done)
        self._settle(done)
        if self.metrics is not None and done:
            self.metrics.running.set(len(self.batch))
            self.metrics.waiting.set(len(self._waiting) + self.queue.qsize())

    def _settle(self, done: list[Row]) -> None:
        """Rows that are done: when all of a job's are, its result."""
        for row in done:
            job = row.prompt.owner
            rows = self._jobs.get(id(job))
            if rows is None or not all(r.done for r in rows):
                continue
            del self._jobs[id(job)]
            if job.cancelled.is_set() or job.future.done():
                for r in rows:
                    self._choices.pop(id(r), None)
                _fail(job, Cancelled("the client left: the request was dropped"))
                if self.metrics is not None and job.cancelled.is_set():
                    self.metrics.cancelled.inc()
                continue
            result = self._result(job, rows)
            if self.metrics is not None:
                self.metrics.finished(result)
            job.future.set_result(result)

    def _result(self, job: Job, rows: list[Row]) -> dict[str, Any]:
        """The job's result: per choice its text, finish reason, counted tokens and picks; the prompt's token count
        (and log-probabilities with ``echo``), the routing and the most rows the job ran with."""
        choices = []
        for r in rows:
            c = self._choices.pop(id(r))
            choices.append({"index": r.index, "text": c.tail.text, "finish_reason": c.tail.finish or "length",
                            "completion_tokens": c.tail.counted, "picks": c.picks, "batch": c.batch})
        first = rows[0]
        return {"choices": choices, "prompt_tokens": len(job.ids), "prompt_ids": job.ids,
                "completion_tokens": sum(c["completion_tokens"] for c in choices),
                "prompt_logprobs": first.prompt_logprobs, "routing": first.state.trace()[0],
                "batch_size": max(c["batch"] for c in choices)}


def _fail(job: Job, e: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(e)

