"""The op layer: wrappers over torch.ops.exemplar with their fake kernels
(kernels.py), the operands they take (operands.py), the one top-k order
(order.py) and the choice of precision= (precision.py). Everything above
it (curvatures, methods, the engine) reaches the kernels through here."""
from .kernels import (
                      TOPK_KERNELS,
                      cholesky_norms,
                      cholesky_quad_norms,
                      cuda_compiled,
                      dense_norms,
                      eigenbasis_norms,
                      ekfac_eigenvalues,
                      exact_hessian,
                      kfac_factors,
                      residuals,
                      scores,
                      scores_rank1,
                      screened_topk,
                      screened_topk_rank1,
                      topk,
                      topk_rank1,
)
from .operands import General, LowRank, Query, Rank1, TrainOperands, scaled
from .order import check_k, merge_topk
from .precision import PRECISIONS, check_precision

__all__ = ["TOPK_KERNELS", "cholesky_norms", "cholesky_quad_norms", "cuda_compiled", "dense_norms",
           "eigenbasis_norms", "ekfac_eigenvalues", "exact_hessian", "kfac_factors", "residuals", "scores",
           "scores_rank1", "screened_topk", "screened_topk_rank1", "topk", "topk_rank1", "General", "LowRank",
           "Query", "Rank1", "TrainOperands", "scaled", "check_k", "merge_topk", "PRECISIONS", "check_precision"]
