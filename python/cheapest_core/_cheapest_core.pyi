"""Type stubs for the compiled core; checked by `python -m mypy.stubtest`."""

__version__: str
