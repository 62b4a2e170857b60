"""Shared pytest configuration. Fixtures live in per-concern plugin modules
beside this file so that each area of the service owns its own."""

pytest_plugins = ["fixtures_model", "fixtures_embedding", "fixtures_payments", "fixtures_server"]
