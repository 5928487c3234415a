"""Evaluation: task files, their metrics, and `mmfm eval` (docs/evaluation.md)."""
