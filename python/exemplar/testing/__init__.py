"""For tests and checks: the float64 reference implementations every kernel
is checked against (reference.py) and a softmax-regression fit (linear.py)."""
