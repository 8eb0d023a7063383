"""mplus: M+ and MemoryLLM on a hand-written Llama-3.1 in pure PyTorch."""
from .config import ConfigError, LlamaConfig, RopeScaling
from .generate import generate, generate_tokens, sample_next
from .kv_cache import KVCache
from .memory_config import MemoryConfig
from .model import Llama
from .mplus_checkpoint import is_memory_checkpoint
from .mplus_model import MPlus
from .state import MemoryState, StateError
from .tokenizer import StreamDecoder, Tokenizer, TokenizerError
from .weights import WeightsError

# One class serves both: the kind (M+ or MemoryLLM) is read from the checkpoint's config.json.
MemoryLLM = MPlus

__all__ = ["ConfigError", "KVCache", "Llama", "LlamaConfig", "MPlus", "MemoryConfig", "MemoryLLM", "MemoryState",
           "RopeScaling", "StateError", "StreamDecoder", "Tokenizer", "TokenizerError", "WeightsError", "generate", "generate_tokens",
           "is_memory_checkpoint", "sample_next"]
__version__ = "0.1.0"
