"""Helpers for tests that need real external services."""
