"""QIN: the Quadratic Interest Network for multimodal CTR prediction."""
from qin.config import QINConfig
from qin.model import QIN

__all__ = ["QIN", "QINConfig"]
__version__ = "0.1.0"
