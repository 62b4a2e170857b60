"""The HTTP server, transport only: the app, one route table, RSGI/ASGI, errors, SSE.

`granian --interface rsgi cheapest.server:app`: `app` is built on first access (Granian's import, in the
worker) from `load_settings()`. `cheapest serve` hands each worker an app built from its own settings instead
(`load_app`).
"""

from typing import Any

from cheapest.server.application import App, load_app

__all__ = ["App", "app", "load_app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from cheapest.config import load_settings

        globals()["app"] = app = App(load_settings())
        return app
    raise AttributeError(name)
