"""Test-only helpers shared across test folders (imported as tests.support; pytest puts the repository root on sys.path)."""
