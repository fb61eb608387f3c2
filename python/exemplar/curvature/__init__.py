"""Curvatures, registered by name like methods (docs/design.md §2, §4): the
base class and registry (base.py) and the library's own, each one module:
exact.py ("exact"), kfac.py ("kfac", "ekfac"), identity.py ("identity"),
and blocks.py, a whole network's layers as one block-diagonal curvature.
A new curvature is one subclass of Curvature decorated with @register."""
# isort: skip_file
# (import order is registration order: exact, kfac, ekfac, identity)
from .base import (PSEUDO_INVERSE_FLOOR, RANK_APPLIES, RCOND, Curvature, LayerStatistics, Statistics, build,
                   cast_inverse, check_pseudo_inverse, fits_layers, form, from_state, get, get_for_layers,
                   gradient_sq_norms, inverse_damped, mean_sq_norm, names, register, shape_and_dtype, state,
                   unregister, weighted)
from .exact import (EXACT_GFLOPS, EXACT_MATRICES, EXACT_MAX_WIDTH, Exact, ExactCholesky, LayerCholesky,
                    available_bytes, check_exact_fits, exact_cost, project_out_null, residual_basis)
from .kfac import EKFAC, KFAC, LOW_RANK_TOL, Eigenbasis, Factored, LowRankEigenbasis, without_null_direction
from .identity import Identity
from .blocks import LayerBlocks

__all__ = ["PSEUDO_INVERSE_FLOOR", "RANK_APPLIES", "RCOND", "Curvature", "LayerStatistics", "Statistics", "build",
           "cast_inverse", "check_pseudo_inverse", "fits_layers", "form", "from_state", "get", "get_for_layers",
           "gradient_sq_norms", "inverse_damped", "mean_sq_norm", "names", "register", "shape_and_dtype", "state",
           "unregister", "weighted", "EXACT_GFLOPS", "EXACT_MATRICES", "EXACT_MAX_WIDTH", "Exact", "ExactCholesky",
           "LayerCholesky", "available_bytes", "check_exact_fits", "exact_cost", "project_out_null",
           "residual_basis", "EKFAC", "KFAC", "LOW_RANK_TOL", "Eigenbasis", "Factored", "LowRankEigenbasis",
           "without_null_direction", "Identity", "LayerBlocks"]
