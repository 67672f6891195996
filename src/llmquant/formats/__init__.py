"""Block formats keyed by ggml type: ``get_format(qtype).quantize(rows, importance)``."""

from .base import QuantFormat, get_format, registered_types
from . import floats, iquants, kquants, legacy, ternary  # noqa: F401  (registers the classes)

__all__ = ["QuantFormat", "get_format", "registered_types"]
