"""Analyses built on an Attributor: DIVINE diverse selection (selection.py),
data debugging by self-influence (debugging.py), and the counterfactual
yardsticks: retrained ground truth (retraining.py, refit.py, callback.py) and LDS and
leave-one-out correlation (counterfactual.py)."""
