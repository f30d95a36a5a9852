"""Helpers for the stage-2 render tests (tiny model, dataset checks, subprocess entry points)."""
