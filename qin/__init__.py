"""QIN: the Quadratic Interest Network for multimodal CTR prediction."""
from qin.config import QINConfig

__all__ = ["QIN", "QINConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # qin.QIN on first use: importing the model imports torch (seconds), which the `qin` command's
    # --help and its argument errors do without.
    if name == "QIN":
        from qin.model import QIN

        return QIN
    raise AttributeError(f"module 'qin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "QIN"})
