"""Test-only helpers shared across test folders (on sys.path through pytest's pythonpath setting)."""
