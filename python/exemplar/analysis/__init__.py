"""Analyses built on an Attributor: DIVINE diverse selection (selection.py)
and data debugging by self-influence (debugging.py)."""
