"""The engine contract's types, for the fixed-output engine that still lives in this package.

The contract itself is `cheapest.engine.types`; this module only keeps `inference/fixed.py` importing.
"""

from cheapest.engine.types import ContextLengthError, Delta, Engine, EngineError, Finish, SamplingParams

__all__ = ["ContextLengthError", "Delta", "Engine", "EngineError", "Finish", "SamplingParams"]
