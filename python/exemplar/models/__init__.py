"""Whole models around the engine: hooks that collect a last layer's inputs
and outputs (hooks.py), the model-level Explainer (explainer.py) and tree
ensembles as a last layer (trees.py)."""
