"""mplus: M+ and MemoryLLM on a hand-written Llama-3.1 in pure PyTorch."""
from mplus.llama.config import ConfigError, LlamaConfig, RopeScaling
from mplus.llama.generate import generate, generate_tokens, sample_next
from mplus.llama.kv_cache import KVCache
from mplus.memory.config import MemoryConfig
from mplus.llama.model import Llama
from mplus.memory.checkpoint import is_memory_checkpoint
from mplus.memory.mplus import MPlus
from mplus.memory.state import MemoryState, StateError
from mplus.llama.tokenizer import StreamDecoder, Tokenizer, TokenizerError
from mplus.formats.hf_folder import WeightsError

# One class serves both: the kind (M+ or MemoryLLM) is read from the checkpoint's config.json.
MemoryLLM = MPlus

__all__ = ["ConfigError", "KVCache", "Llama", "LlamaConfig", "MPlus", "MemoryConfig", "MemoryLLM", "MemoryState",
           "RopeScaling", "StateError", "StreamDecoder", "Tokenizer", "TokenizerError", "WeightsError", "generate", "generate_tokens",
           "is_memory_checkpoint", "sample_next"]
__version__ = "0.1.0"
