"""Model sources: metadata + tensors streamed one at a time as float32."""

from .gguf_header import GGUFHeader, MetadataField, parse_gguf
from .gguf_source import GGUFSource, TensorInfo

__all__ = ["GGUFHeader", "GGUFSource", "MetadataField", "TensorInfo", "parse_gguf"]
