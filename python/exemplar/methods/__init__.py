"""Attribution methods, registered by name (docs/design.md §1, §4): the base
class, registry and Context protocol (base.py) and the library's own:
influence.py (if, theta_relatif, l_relatif, grad_dot, grad_cos),
representer.py (rps_l2, rps_lje, with the refits in rps.py), knn.py (knn).
A new method is one subclass of Method decorated with @register."""
# isort: skip_file
# (import order is registration order, which exemplar.METHODS lists)
from .base import Context, Method, Rows, get, names, register, safe_reciprocal, test_residuals, unregister
from . import influence, representer, knn  # noqa: F401  (registers them)

__all__ = ["Context", "Method", "Rows", "get", "names", "register", "safe_reciprocal", "test_residuals",
           "unregister"]
