"""mplus: M+ and MemoryLLM on a hand-written Llama-3.1 in pure PyTorch."""
from .config import ConfigError, LlamaConfig, RopeScaling
from .generate import generate, generate_tokens, sample_next
from .kv_cache import KVCache
from .model import Llama
from .tokenizer import StreamDecoder, Tokenizer
from .weights import WeightsError

__all__ = ["ConfigError", "KVCache", "Llama", "LlamaConfig", "RopeScaling", "StreamDecoder", "Tokenizer", "WeightsError",
           "generate", "generate_tokens", "sample_next"]
__version__ = "0.1.0"
