"""The Granian application object: `granian --interface rsgi cheapest.server:app`."""

from cheapest.http.app import app

__all__ = ["app"]
