"""The OpenAI-compatible HTTP server (``moerge serve``; needs the ``server`` extra)."""

from moerge.serving.app import ServerConfig, create_app, serve

__all__ = ["ServerConfig", "create_app", "serve"]
