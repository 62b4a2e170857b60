"""The package's public face: every export of the extension is imported by name in cheapest_core."""

from __future__ import annotations

import cheapest_core
from cheapest_core import _cheapest_core


def test_every_export_is_imported_by_name() -> None:
    assert cheapest_core.__all__ == _cheapest_core.__all__
    assert set(cheapest_core.__all__) == {n for n in dir(_cheapest_core) if not n.startswith("_")} | {"__version__"}
    with open(cheapest_core.__file__, encoding="utf-8") as f:
        source = f.read()
    for name in cheapest_core.__all__:
        assert getattr(cheapest_core, name) is getattr(_cheapest_core, name)
        assert f"    {name},\n" in source, f"{name} is not imported by name in cheapest_core/__init__.py"
