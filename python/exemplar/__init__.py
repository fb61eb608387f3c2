"""exemplar: explain a classifier's predictions by the training examples behind them.

The package is laid out by extension point, imports running one way
(docs/design.md §4): ops <- curvature <- methods <- engine <- models /
analysis / report <- cli, with data, progress, results and storage below
the engine."""
from . import curvature, methods
from .analysis.callback import retrain_model
from .analysis.counterfactual import Evaluation, lds, leave_one_out
from .analysis.debugging import Fit, debug_labels, flip_labels, inspection_order
from .analysis.retraining import Retraining, retrain_head
from .analysis.selection import divine, divine_global
from .data import LastLayerData
from .engine import Attributor, Settings
from .methods import Method, register
from .models.explainer import Explainer
from .models.hooks import LastLayer
from .models.network import NetworkExplainer
from .ops import General, Query, Rank1, TrainOperands, cuda_compiled
from .report import plot
from .report.html import report
from .results import Explanation, TopK

METHODS = methods.names()
INFLUENCE_METHODS = methods.names("influence")
CURVATURES = curvature.names()

__all__ = ["Attributor", "Settings", "LastLayerData", "LastLayer", "Explainer", "NetworkExplainer", "Explanation",
           "TopK", "report", "plot", "CURVATURES", "INFLUENCE_METHODS", "METHODS", "Method", "register", "methods",
           "curvature",
           "TrainOperands", "Query", "General", "Rank1", "cuda_compiled", "divine", "divine_global",
           "inspection_order", "flip_labels", "debug_labels", "Fit", "retrain_head", "retrain_model", "Retraining",
           "lds", "leave_one_out", "Evaluation"]
__version__ = "0.1.0"
