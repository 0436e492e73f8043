"""Eyecare-Bench records, loaders, metrics and reports (no torch)."""
