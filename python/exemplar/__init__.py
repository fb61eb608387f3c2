"""exemplar: explain a classifier's predictions by the training examples behind them."""
from . import methods
from .attributor import CURVATURES, INFLUENCE_METHODS, METHODS, Attributor
from .curvature import General, Rank1
from .data import LastLayerData
from .debugging import Fit, debug_labels, flip_labels, inspection_order
from .explainer import Explainer
from .hooks import LastLayer
from . import plot
from .html_report import report
from .methods import Method, Query, TrainOperands, register
from .ops import cuda_compiled
from .results import Explanation, TopK
from .selection import divine, divine_global

__all__ = ["Attributor", "LastLayerData", "LastLayer", "Explainer", "Explanation", "TopK", "report", "plot",
           "CURVATURES", "INFLUENCE_METHODS", "METHODS", "Method", "register", "methods", "TrainOperands",
           "Query", "General", "Rank1", "cuda_compiled", "divine", "divine_global", "inspection_order",
           "flip_labels", "debug_labels", "Fit"]
__version__ = "0.1.0"
