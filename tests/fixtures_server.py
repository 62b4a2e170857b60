"""Fixtures: a real Granian server on loopback, accounts and keys."""
