"""``BaseRecord``: the base model a library is made for, and the checks that keep other bases' experts out."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from moerge.adapters.expert import DeltaWeights, Expert
from moerge.adapters.peft_loader import check_targets
from moerge.core.fingerprint import (
    check_expert_shapes,
    compact_fingerprint,
    compare_fingerprints,
    fingerprint,
)
from moerge.errors import BaseMismatchError, ExpertFormatError

__all__ = ["BaseRecord", "DEFAULT_MAX_RANK"]

DEFAULT_MAX_RANK = 1024  # LoRA ranks above this are refused unless the library was made with another cap


def _check_cap(n: Any) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"max_rank must be a positive integer, got {n!r}")
    return n


def _local(spec: str) -> bool:
    """Whether a base's record is a folder path (whose hub name cannot be known) rather than a model id."""
    spec = str(spec)
    return spec.startswith(("/", ".", "~")) or "\\" in spec or Path(spec).expanduser().exists()


def _model_name(spec: str) -> str:
    """A base's name for comparison: the last part of a hub id or folder path, lower case."""
    return str(spec).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()


@dataclass(frozen=True)
class BaseRecord:
    """What a library's manifest records of its base: an id, a fingerprint (see
    :func:`moerge.core.fingerprint.fingerprint`), and the highest LoRA rank an expert may have.

    Attributes:
        model: the base's id or folder path (``None`` when unknown).
        fingerprint: the base's fingerprint (``None``: nothing is checked against it).
        max_rank: LoRA experts of a higher rank are refused.
        file: the manifest the record comes from, named in the errors.
    """

    model: str | None
    fingerprint: dict[str, Any] | None
    max_rank: int = DEFAULT_MAX_RANK
    file: str | None = None

    @classmethod
    def of(cls, base_model: nn.Module | str | None, base_fingerprint: dict[str, Any] | None = None,
           max_rank: int | None = None) -> BaseRecord:
        """The record of a new library's base: a loaded model (its id and fingerprint) or an id with an optional
        fingerprint; ``max_rank`` defaults to :data:`DEFAULT_MAX_RANK`."""
        if isinstance(base_model, nn.Module):
            base_id = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None
            base_fingerprint = fingerprint(base_model)
        else:
            base_id = base_model
        return cls(base_id, base_fingerprint, DEFAULT_MAX_RANK if max_rank is None else _check_cap(max_rank))

    @classmethod
    def from_manifest(cls, data: dict[str, Any], file: str | None = None) -> BaseRecord:
        """The record held by the manifest ``data``."""
        return cls(data.get("base_model"), data.get("base_fingerprint"),
                   int(data.get("max_rank") or DEFAULT_MAX_RANK), file)

    def check_model(self, base: nn.Module, *, strict_weights: bool = True) -> list[str]:
        """Check ``base`` against the record: :class:`BaseMismatchError` for another architecture or other shapes,
        and for other weights when ``strict_weights``; returns the weight differences otherwise."""
        if not self.fingerprint:
            return []
        arch, weights = compare_fingerprints(self.fingerprint, fingerprint(base))
        if arch:
            raise BaseMismatchError("the model is not the library's base: " + "; ".join(arch), file=self.file)
        if weights and strict_weights:
            raise BaseMismatchError(
                "the model has the library's architecture but other weights (" + "; ".join(weights) + "); pass "
                "strict_base=False to apply the experts to this version of the base anyway",
                file=self.file,
            )
        return weights

    def admit(self, expert: Expert, *, allow_other_base: bool = False) -> Expert:
        """``expert`` checked against the record, stamped with the (compact) fingerprint it was checked against
        when it had none.

        Refused: a LoRA rank above :attr:`max_rank`; shapes or modules the base does not have; a fingerprint of
        another architecture; an expert whose own record names another base (compared by model name when both are
        ids, not folder paths) unless ``allow_other_base`` (then a warning)."""
        over = {m: w.rank for m, w in expert.modules.items() if not isinstance(w, DeltaWeights) and w.rank > self.max_rank}
        if over:
            m, r = next(iter(over.items()))
            raise ExpertFormatError(f"module {m!r}: rank {r} exceeds the library's cap of {self.max_rank}",
                                    expert=expert.name)
        theirs, ours = expert.metadata.base_model, self.model
        if theirs and ours and not (_local(theirs) or _local(ours)) and _model_name(theirs) != _model_name(ours):
            msg = (f"made for base {theirs!r} (its base_model_name_or_path), the library's base is {ours!r}; "
                   "pass allow_other_base=True if it is the same model under another name")
            if not allow_other_base:
                raise BaseMismatchError(msg, expert=expert.name)
            warnings.warn(f"expert {expert.name!r}: {msg}", stacklevel=3)
        fp = self.fingerprint
        if fp and fp.get("modules"):
            check_expert_shapes(expert, {**fp["modules"], **fp.get("moe_targets", {})}, "the library's base",
                                moe_known="moe_targets" in fp)  # else recorded before moerge knew MoE targets
            check_targets(expert, fp["modules"], "the library's base")
        efp = expert.metadata.base_fingerprint
        if fp and efp:
            arch, _ = compare_fingerprints(fp, efp)
            if arch:
                raise BaseMismatchError("made for another base: " + "; ".join(arch), expert=expert.name)
        if efp is None and fp:
            expert = dataclasses.replace(expert, metadata=dataclasses.replace(
                expert.metadata, base_fingerprint=compact_fingerprint(fp)))
        return expert
