"""Callbacks: everything a run can do without, one responsibility per file."""
