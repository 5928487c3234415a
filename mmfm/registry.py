"""Name -> implementation tables (filters, dedup stages, losses): one lookup with one error message."""

from __future__ import annotations


def lookup(table: dict, name: str, what: str):
    """table[name]; ValueError naming the unknown `what` and listing the known names otherwise."""
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]
