"""Integrations with inference frameworks (each behind its own optional import)."""
