"""exemplar: explain a classifier's predictions by the training examples behind them."""
from .attributor import CURVATURES, METHODS, Attributor
from .data import LastLayerData
from .ops import cuda_compiled

__all__ = ["Attributor", "LastLayerData", "CURVATURES", "METHODS", "cuda_compiled"]
__version__ = "0.1.0"
