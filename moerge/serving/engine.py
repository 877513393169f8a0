"""The server's engine: runs completion jobs on the model, batched by a worker thread or streamed one per thread.

Requests that arrive together are batched: the worker takes what is queued within ``batch_window`` seconds (up to
``max_batch``), groups jobs that can share one ``generate`` call (same sampling settings, routed or forced, same
exclusions) and runs each group as one batch, every row routed on its own. Streamed jobs run one per call, in their
own thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

__all__ = ["Engine", "Job", "ServerConfig", "queued"]

T = TypeVar("T")


@dataclass
class ServerConfig:
    """How the server batches requests, how many tokens a request gets when it does not say, how many expert
    uploads may wait to be added (more are refused) and how many finished ones it remembers, and the API key that
    changing the experts (or, with ``api_key_for_all``, any request) needs."""

    max_batch: int = 8
    batch_window: float = 0.02  # seconds the worker waits for more requests after the first
    default_max_tokens: int = 128
    max_pending_uploads: int = 8
    upload_history: int = 100
    api_key: str | None = None  # required (Authorization: Bearer …) to upload or delete experts
    api_key_for_all: bool = False  # and for every other route as well
    admin: bool = True  # False: uploads and deletes are refused (403), e.g. when reachable from other machines
    # without a key


@dataclass
class Job:
    """One completion to generate; its result (or error) arrives in ``future``."""

    text: str  # the prompt, chat template applied
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    experts: dict[str, float] | None
    exclude: tuple[str, ...]
    seed: int | None
    future: Future = field(default_factory=Future)

    def key(self) -> tuple:
        """Requests with the same key can run in one generate call."""
        return (self.temperature, self.top_p, self.experts is not None, self.exclude, self.seed)


def queued(items: queue.Queue[T], stop: threading.Event) -> Iterator[T]:
    """The items put in ``items``, as they come, until ``stop`` is set (looked at every 0.1 s while none comes):
    the loop of a worker thread."""
    while not stop.is_set():
        try:
            yield items.get(timeout=0.1)
        except queue.Empty:
            continue


def _fail(job: Job, e: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(e)


class Engine:
    """Runs jobs on the model: batched (a worker thread) or streamed (one thread per request)."""

    def __init__(self, model: Any, tokenizer: Any, config: ServerConfig) -> None:
        self.model, self.tok, self.config = model, tokenizer, config
        tokenizer.padding_side = "left"
        vocab = tokenizer.get_vocab()
        self.ends = {tokenizer.eos_token_id, self.pad_id} | ({vocab["<|im_end|>"]} if "<|im_end|>" in vocab else set())
        self.tok_lock = threading.Lock()
        self.queue: queue.Queue[Job] = queue.Queue()
        self.batches: list[int] = []  # sizes of the batches run (for tests and /v1/moerge/stats)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._loop, name="moerge-batcher", daemon=True)
        self._worker.start()

    def close(self) -> None:
        """Stop the batching worker."""
        self._stop.set()
        self._worker.join(timeout=5)

    def submit(self, job: Job) -> Future:
        """Queue ``job`` for the batching worker; its future gets the completion's result dict."""
        self.queue.put(job)
        return job.future

    @property
    def pad_id(self) -> int:
        tok = self.tok
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _kwargs(self, job: Job, max_new: int) -> dict[str, Any]:
        kw: dict[str, Any] = dict(max_new_tokens=max_new, pad_token_id=self.pad_id)
        if job.temperature > 0:
            kw.update(do_sample=True, temperature=job.temperature, top_p=job.top_p)
        else:
            kw.update(do_sample=False)
        return kw

    def _loop(self) -> None:
        for first in queued(self.queue, self._stop):
            jobs = [first]
            deadline = time.monotonic() + self.config.batch_window
            while len(jobs) < self.config.max_batch:
                try:
                    jobs.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # drop requests given up on
            groups: dict[tuple, list[Job]] = {}
            for j in jobs:
                groups.setdefault(j.key(), []).append(j)
            for group in groups.values():
                self._run_group(group)

    def _run_group(self, group: list[Job]) -> None:
        try:
            self._run(group)
        except BaseException as e:  # noqa: BLE001 - one batch's failure is its requests', not the worker's
            if len(group) == 1:
                _fail(group[0], e)
                return
            for job in group:  # run alone, so one bad request does not fail the others
                try:
                    self._run([job])
                except BaseException as e1:  # noqa: BLE001
                    _fail(job, e1)

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` has (no special tokens added)."""
        with self.tok_lock:
            return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded token ids of ``texts`` on the model's device (the fast tokenizer's padding settings are
        shared state: one call at a time)."""
        with self.tok_lock:
            batch = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.model.device) for k, v in batch.items()}

    def _run(self, jobs: list[Job]) -> None:
        batch = self.encode([j.text for j in jobs])
        first = jobs[0]
        if first.seed is not None:
            torch.manual_seed(first.seed)
        with torch.no_grad():
            out = self.model.generate(**batch, experts=[j.experts for j in jobs] if first.experts is not None
                                      else None, exclude=first.exclude or None,
                                      **self._kwargs(first, max(j.max_tokens for j in jobs)))
        routing = self.model.last_routing
        self.batches.append(len(jobs))
        width = batch["input_ids"].shape[1]
        for b, job in enumerate(jobs):
            ids = out[b, width:].tolist()
            text, finish, n = self._finish(ids, job)
            if not job.future.done():
                job.future.set_result({"text": text, "finish_reason": finish, "completion_tokens": n,
                                       "prompt_tokens": int(batch["attention_mask"][b].sum()),
                                       "routing": routing[b], "batch_size": len(jobs)})

    def _finish(self, ids: list[int], job: Job) -> tuple[str, str, int]:
        """The completion's text, why it ended and its token count: cut at the end of turn / EOS, at the request's
        own max_tokens (a batch generates up to its longest), and at the first stop sequence."""
        finish = "length"
        kept: list[int] = []
        for t in ids[: job.max_tokens]:
            if t in self.ends:  # end of sequence, padding, or the chat template's end of turn
                finish = "stop"
                break
            kept.append(t)
        text = self.tok.decode(kept, skip_special_tokens=True)
        for s in job.stop:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        return text, finish, len(kept)

    def stream(self, job: Job, info: dict[str, Any]) -> Iterator[str]:
        """The completion's text in pieces, as generated (one request per generate call); when done, ``info``
        holds the finish reason, the routing and the token count."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        batch = self.encode([job.text])
        result: dict[str, Any] = {}
        cancel = threading.Event()  # a stop sequence was met, or the client went away: stop generating

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        def run() -> None:
            try:
                with torch.no_grad():
                    out = self.model.generate(**batch, streamer=streamer, experts=job.experts,
                                              exclude=job.exclude or None,
                                              stopping_criteria=StoppingCriteriaList([Cancelled()]),
                                              **self._kwargs(job, job.max_tokens))
                result["routing"] = self.model.last_routing[0]
                result["ids"] = out[0, batch["input_ids"].shape[1]:].tolist()
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        sent, stopped = "", False
        try:
            for piece in streamer:
                if stopped:
                    continue  # what the generation made before it saw the cancel
                text = sent + piece
                cut = min((text.index(s) for s in job.stop if s and s in text), default=None)
                if cut is not None:
                    text, stopped = text[:cut], True
                    cancel.set()
                if len(text) > len(sent):
                    yield text[len(sent):]
                sent = text
        finally:  # also when the client disconnects (the generator is closed)
            cancel.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        _, finish, n = self._finish(result["ids"], job)
        info.update(finish_reason="stop" if stopped else finish, routing=result["routing"], completion_tokens=n,
                    prompt_tokens=int(batch["attention_mask"].sum()))
