"""Fixtures: tiny random-weight models built from a GGUF the tests write, and the real SmolLM2."""
