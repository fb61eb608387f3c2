"""exemplar: explain a classifier's predictions by the training examples behind them."""
from .attributor import CURVATURES, INFLUENCE_METHODS, METHODS, Attributor
from .data import LastLayerData
from .debugging import Fit, debug_labels, flip_labels, inspection_order
from .explainer import Explainer, Explanation
from .hooks import LastLayer
from .ops import cuda_compiled
from .selection import divine, divine_global

__all__ = ["Attributor", "LastLayerData", "LastLayer", "Explainer", "Explanation", "CURVATURES",
           "INFLUENCE_METHODS", "METHODS", "cuda_compiled", "divine", "divine_global",
           "inspection_order", "flip_labels", "debug_labels", "Fit"]
__version__ = "0.1.0"
