"""The Granian application object: `granian --interface rsgi cheapest.server:app`.

`app` is built on first access (Granian's import in the worker) from `load_settings()`; `cheapest serve` passes
its own settings to each worker through `load_app` instead.
"""

from typing import Any

from cheapest.http.app import App, load_app

__all__ = ["App", "app", "load_app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from cheapest.config import load_settings

        globals()["app"] = app = App(load_settings())
        return app
    raise AttributeError(name)
