"""Integrations of ATS into model families (one module per family)."""
