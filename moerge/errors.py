"""Exceptions raised by moerge. Each names the file, the expert and the problem where they are known."""

from __future__ import annotations

__all__ = ["MoErgeError", "ExpertFormatError", "LibraryError", "BaseMismatchError", "RoutingError"]


class MoErgeError(Exception):
    """Base class of moerge's errors. ``file`` and ``expert`` name where the problem is, when known."""

    def __init__(self, problem: str, *, expert: str | None = None, file: str | None = None) -> None:
        self.problem = problem
        self.expert = expert
        self.file = str(file) if file is not None else None
        parts = []
        if self.expert is not None:
            parts.append(f"expert {self.expert!r}")
        if self.file is not None:
            parts.append(f"file {self.file}")
        super().__init__(f"{', '.join(parts)}: {problem}" if parts else problem)

    def at(self, file: str | None) -> MoErgeError:
        """This error naming ``file``, when it named no file (raised from code that did not know it)."""
        if self.file is not None or file is None:
            return self
        return type(self)(self.problem, expert=self.expert, file=file)


class ExpertFormatError(MoErgeError, ValueError):
    """An expert's files or tensors are malformed, unsafe (pickle) or unsupported."""


class LibraryError(MoErgeError, RuntimeError):
    """The expert library folder is missing, corrupt, or the operation conflicts with its contents."""


class BaseMismatchError(MoErgeError, ValueError):
    """An expert or library was made for another base model (architecture, shapes or weights differ)."""


class RoutingError(MoErgeError, ValueError):
    """A routing request cannot be served: unknown expert, bad weights, missing per-row choice."""
