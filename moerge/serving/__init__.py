"""The OpenAI-compatible HTTP server (``moerge serve``): :mod:`~moerge.serving.protocol` checks requests,
:mod:`~moerge.serving.engine` batches and runs them, :mod:`~moerge.serving.app` wires the routes. Needs the
``server`` extra (fastapi, uvicorn, python-multipart)."""

from importlib.util import find_spec

# each package of the extra, by the modules it may install as (python-multipart: python_multipart, or multipart
# in its older releases)
_EXTRA = {"fastapi": ("fastapi",), "uvicorn": ("uvicorn",), "python-multipart": ("python_multipart", "multipart")}
_missing = [package for package, modules in _EXTRA.items() if not any(find_spec(m) for m in modules)]
if _missing:
    raise ImportError(f"the moerge server needs {', '.join(_missing)}: pip install \"moerge[server]\"")

from moerge.serving.app import ServerConfig, create_app, serve  # noqa: E402 - only once the extra is known there

__all__ = ["ServerConfig", "create_app", "serve"]
