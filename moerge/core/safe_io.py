"""File I/O that never runs code from a file and never leaves a half-written file behind.

* :func:`load_safetensors` is the only way moerge reads tensors: safetensors, never pickle.
* :func:`atomic_write_bytes` / :func:`atomic_write_json` write a temp file in the same folder, fsync it and rename
  it over the target, so a reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from moerge.errors import ExpertFormatError

__all__ = ["load_safetensors", "load_safetensors_verified", "check_safetensors_header", "save_safetensors", "atomic_write_bytes", "atomic_write_json", "sha256_file",
           "fsync_dir", "TMP_PREFIX"]

TMP_PREFIX = ".moerge-tmp-"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry (after a rename) where the platform allows it."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any thread writes files
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file + fsync + rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_MAX_HEADER = 100 << 20  # the safetensors format's own limit on the header


def check_safetensors_header(path: str | Path, *, expert: str | None = None) -> dict[str, Any]:
    """Read and check a safetensors file's header without loading any tensor; returns it (name → entry).

    Refused, naming the file: a file shorter than its header says, a header that is not a JSON object, a name that
    appears twice (JSON parsers keep the last one silently), an unknown dtype, a shape whose size disagrees with
    its byte range, a byte range outside the data, overlapping ranges, and bytes after the last tensor."""
    path = Path(path)
    with open(path, "rb") as f:
        return _checked_header(f.read, path.stat().st_size, path, expert)


def _checked_header(read: Any, size: int, path: Path, expert: str | None) -> dict[str, Any]:
    """The checks of :func:`check_safetensors_header` on a file of ``size`` bytes read from its start by ``read``."""

    def bad(problem: str) -> ExpertFormatError:
        return ExpertFormatError(f"malformed safetensors file: {problem}", expert=expert, file=str(path))

    head = read(8)
    if len(head) < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(head, "little")
    if n > min(_MAX_HEADER, size - 8):
        raise bad(f"the header says it is {n} bytes long, the file has {size - 8} after the length")
    raw = read(n)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                raise bad(f"the name {k!r} appears twice in the header")
            seen[k] = v
        return seen

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    data = size - 8 - n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: its entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise bad(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise bad(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data):
            raise bad(f"tensor {name!r}: byte range {offsets!r} is outside the file's {data} data bytes")
        count = 1
        for d in shape:
            count *= d
        if count * _DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
            raise bad(f"tensor {name!r}: shape {shape} of {dtype} needs {count * _DTYPE_BYTES[dtype]} bytes, its "
                      f"range holds {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start < end:
            raise bad(f"tensor {name!r}: its bytes overlap another tensor's")
        end = max(end, stop)
    if end != data:
        raise bad(f"{data - end} bytes after the last tensor (truncated or padded file)" if end < data else
                  "tensors end past the data")
    return header


_TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
                 "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "I64": torch.int64,
                 "F64": torch.float64}


def load_safetensors_verified(path: str | Path, sha256: str, *, expert: str | None = None
                              ) -> dict[str, torch.Tensor] | None:
    """Every tensor of a safetensors file, read once: the bytes are hashed and, when their sha256 is ``sha256``,
    checked (:func:`check_safetensors_header`) and viewed as tensors that share the one buffer (no copy). ``None``
    when the sha256 differs. A dtype torch has no plain view for is read by :func:`load_safetensors`."""
    path = Path(path)
    with open(path, "rb") as f:
        buf = bytearray(os.fstat(f.fileno()).st_size)
        got = f.readinto(buf)
    if got != len(buf) or hashlib.sha256(buf).hexdigest() != sha256:
        return None
    view = memoryview(buf)
    pos = [0]

    def read(n: int) -> bytes:
        out = bytes(view[pos[0]: pos[0] + n])
        pos[0] += n
        return out

    header = _checked_header(read, len(buf), path, expert)
    start = pos[0]
    if sys.byteorder != "little" or any(e["dtype"] not in _TORCH_DTYPES for k, e in header.items()
                                        if k != "__metadata__"):
        from safetensors.torch import load

        # safetensors is little-endian (views would be native), or a dtype torch has no plain view for: parsed
        # from the bytes that were hashed
        return load(bytes(buf))
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        a, b = e["data_offsets"]
        t = torch.frombuffer(buf, dtype=_TORCH_DTYPES[e["dtype"]], count=(b - a) // _DTYPE_BYTES[e["dtype"]],
                             offset=start + a) if b > a else torch.empty(0, dtype=_TORCH_DTYPES[e["dtype"]])
        out[name] = t.reshape(e["shape"])
    return out


def load_safetensors(path: str | Path, *, expert: str | None = None) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file on CPU, after :func:`check_safetensors_header`; a malformed file
    raises :class:`ExpertFormatError` naming it. Never pickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ExpertFormatError("refusing to load a file that is not .safetensors", expert=expert, file=str(path))
    try:
        check_safetensors_header(path, expert=expert)
        return load_file(str(path), device="cpu")
    except OSError as e:
        raise ExpertFormatError(f"cannot read safetensors file: {e}", expert=expert, file=str(path)) from None
    except (SafetensorError, ValueError, RuntimeError) as e:
        if isinstance(e, ExpertFormatError):
            raise
        raise ExpertFormatError(f"cannot read safetensors file: {e}", expert=expert, file=str(path)) from None
