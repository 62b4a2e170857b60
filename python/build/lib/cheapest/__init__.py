"""cheapest: privacy-first, OpenAI-compatible inference service."""
