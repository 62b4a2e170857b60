"""Shared pytest configuration. Fixtures live in per-concern plugin modules
beside this file so that each area of the service owns its own."""

# Listed so that each is registered (and its asserts rewritten) before another imports it.
pytest_plugins = ["fixtures_backends", "fixtures_model", "fixtures_embedding", "fixtures_server", "fixtures_hosts",
                  "fixtures_payments"]
