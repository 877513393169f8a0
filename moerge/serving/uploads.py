"""The server's expert uploads, added in the background: ``POST /v1/experts`` queues an upload and answers at once;
one worker thread adds the queued uploads to the model, one at a time, while requests go on being served.

An upload is ``pending`` (queued), ``running`` (the model loads and checks the adapter, prepares its routing data,
writes it to the library and swaps it in), then ``done`` or ``failed`` (with the error, naming the file and the
expert). Until it is done, the model does not have the expert: calls route over the experts they had, and the
expert appears for the calls that start after its swap. The queue is bounded (a full one refuses new uploads) and
so is the history of finished uploads that ``GET /v1/experts/pending`` lists.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moerge.adapters.expert import validate_name
from moerge.core.paths import cache_root
from moerge.errors import MoErgeError
from moerge.serving.engine import queued
from moerge.serving.protocol import MODEL_ID, OpenAIError, expert_body

__all__ = ["Upload", "Uploads"]

Status = Literal["pending", "running", "done", "failed"]
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"  # a PEFT adapter's files


@dataclass
class Upload:
    """One expert upload: its files in ``folder`` (removed once it is added or failed), what to add them as, and
    where it stands."""

    id: str
    name: str
    folder: Path
    description: str
    examples: list[str]
    overwrite: bool
    created: int = field(default_factory=lambda: int(time.time()))
    status: Status = "pending"
    error: OpenAIError | None = None  # why it failed
    expert: dict[str, Any] | None = None  # the expert added, as the API shows it
    finished: Future = field(default_factory=Future)  # resolved (with None) once done or failed

    @property
    def status_url(self) -> str:
        return f"/v1/experts/pending/{self.id}"

    def to_json(self) -> dict[str, Any]:
        """The upload as the API shows it."""
        return {"object": "expert.upload", "id": self.id, "name": self.name, "model": f"{MODEL_ID}/{self.name}",
                "status": self.status, "status_url": self.status_url, "created": self.created,
                "error": None if self.error is None else self.error.body()["error"], "expert": self.expert}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _scratch(model: Any) -> Path:
    """This server's folder for uploads being added: ``<library>/.moerge-uploads/<pid>-<random>`` (the library's own
    area, on its file system; ``$MOERGE_CACHE/uploads/…`` without a library or when it cannot be written). What
    servers whose process is gone left there (kill -9 midway through an upload) is removed first."""
    library = getattr(model, "library", None)
    roots = ([Path(library.root) / ".moerge-uploads"] if library is not None else []) + [cache_root() / "uploads"]
    for root in roots:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for p in root.iterdir():
                pid = p.name.split("-", 1)[0]
                if not (pid.isdigit() and _alive(int(pid))):
                    shutil.rmtree(p, ignore_errors=True)
            mine = root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            mine.mkdir()
            return mine
        except OSError:
            continue
    return Path(tempfile.mkdtemp(prefix="moerge-uploads-"))


class Uploads:
    """The queue of uploads, the worker that adds them to ``model`` one at a time, and the recent ones' records.

    At most ``max_pending`` uploads wait at once; of the finished ones, the newest ``history`` are kept."""

    def __init__(self, model: Any, max_pending: int, history: int) -> None:
        self.model, self.history = model, history
        self.scratch = _scratch(model)
        self._queue: queue.Queue[Upload] = queue.Queue(maxsize=max_pending)
        self._records: OrderedDict[str, Upload] = OrderedDict()  # by id, oldest first
        self._lock = threading.Lock()  # the records and each upload's status
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._loop, name="moerge-uploads", daemon=True)
        self._worker.start()

    def submit(self, name: str, config: bytes, weights: bytes, *, description: str = "",
               examples: list[str] | None = None, overwrite: bool = False) -> Upload:
        """Queue an upload of the adapter ``config`` and ``weights`` (the files' bytes) as expert ``name``.

        Refused at once (:class:`OpenAIError`): a name that cannot name an expert (400); a name the model or its
        library already has, without ``overwrite`` (409); a name another unfinished upload has (409); a full queue
        (429)."""
        try:
            validate_name(name)
        except MoErgeError as e:
            raise OpenAIError(400, str(e), param="name") from None
        if not overwrite and self._taken(name):
            raise OpenAIError(409, f"expert {name!r} already exists; send overwrite=true to replace it",
                              "expert_exists", "name")
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self.scratch))
        (folder / CONFIG_FILE).write_bytes(config)
        (folder / WEIGHTS_FILE).write_bytes(weights)
        upload = Upload(f"upload-{uuid.uuid4().hex[:24]}", name, folder, description, list(examples or []), overwrite)
        refused = None
        with self._lock:
            busy = next((u for u in self._records.values() if u.name == name and not u.finished.done()), None)
            if busy is not None:
                refused = OpenAIError(409, f"expert {name!r} is already being uploaded; see {busy.status_url}",
                                      "upload_in_progress", "name")
            else:
                try:
                    self._queue.put_nowait(upload)
                except queue.Full:
                    refused = OpenAIError(429, f"{self._queue.maxsize} uploads are already waiting; retry once one "
                                               "is done", "too_many_uploads")
                else:
                    self._records[upload.id] = upload
                    self._forget_old()
        if refused is not None:
            shutil.rmtree(folder, ignore_errors=True)
            raise refused
        return upload

    def _taken(self, name: str) -> bool:
        library = getattr(self.model, "library", None)
        return name in self.model.experts or (library is not None and name in library)

    def _forget_old(self) -> None:
        """Drop the oldest finished records beyond :attr:`history` (call under the lock)."""
        finished = [i for i, u in self._records.items() if u.finished.done()]
        for i in finished[: max(0, len(finished) - self.history)]:
            del self._records[i]

    def get(self, upload_id: str) -> dict[str, Any]:
        """Upload ``upload_id`` as the API shows it; 404 when it is not known (or no longer kept)."""
        with self._lock:
            upload = self._records.get(upload_id)
            if upload is None:
                raise OpenAIError(404, f"no upload {upload_id!r}; see GET /v1/experts/pending", "upload_not_found")
            return upload.to_json()

    def recent(self) -> list[dict[str, Any]]:
        """The unfinished uploads and the newest finished ones, newest first."""
        with self._lock:
            return [u.to_json() for u in reversed(self._records.values())]

    def close(self) -> None:
        """Stop the worker (an addition under way finishes on its own) and fail the uploads still queued."""
        self._stop.set()
        self._worker.join(timeout=5)
        while True:
            try:
                upload = self._queue.get_nowait()
            except queue.Empty:
                break
            self._finish(upload, error=OpenAIError(503, "the server shut down before the upload was added",
                                                   "server_shutdown"))
        if not self._worker.is_alive():
            shutil.rmtree(self.scratch, ignore_errors=True)

    def _loop(self) -> None:
        for upload in queued(self._queue, self._stop):
            self._add(upload)

    def _add(self, upload: Upload) -> None:
        """Add ``upload`` to the model (every check of the library; the routing data prepared off the serving
        path; the expert swapped in at once), recording how it went."""
        with self._lock:
            upload.status = "running"
        try:
            expert = self.model.add_expert(upload.folder, name=upload.name, description=upload.description,
                                           examples=upload.examples, overwrite=upload.overwrite)
        except (MoErgeError, ValueError) as e:  # a refused adapter
            self._finish(upload, error=OpenAIError(400, self._message(e, upload), "expert_refused"))
        except Exception as e:  # noqa: BLE001 - the worker goes on; the failure is the upload's, reported in it
            self._finish(upload, error=OpenAIError(500, f"{type(e).__name__}: {self._message(e, upload)}",
                                                   "upload_failed"))
        else:
            self._finish(upload, expert=expert_body(expert))

    @staticmethod
    def _message(e: BaseException, upload: Upload) -> str:
        """The error's message, naming the uploaded files as ``upload/<file>`` rather than the temporary folder."""
        return str(e).replace(str(upload.folder), "upload")

    def _finish(self, upload: Upload, *, expert: dict[str, Any] | None = None,
                error: OpenAIError | None = None) -> None:
        shutil.rmtree(upload.folder, ignore_errors=True)
        with self._lock:
            upload.status, upload.expert, upload.error = ("failed" if error else "done"), expert, error
            upload.finished.set_result(None)
            self._forget_old()
