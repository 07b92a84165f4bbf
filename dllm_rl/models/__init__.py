"""Diffusion LMs: the protocol the engine needs (base.py), the built-in tiny MDM and its tokenizer, and
loading (load.py).

Importing this package registers the native model classes with transformers' Auto classes, so
`AutoModel.from_pretrained(checkpoint)` works after `import dllm_rl.models` (or any use of the trainers or
`dllm_rl.generate`; transformers' own, explicit registration API; done here once, not scattered over modules).
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .base import ModelTraits, traits, unwrap
from .cache import KVCache
from .diffusion_gemma import DiffusionGemmaLM
from .dream import DreamConfig, DreamModel
from .hf import HFDiffusionLM
from .llada import LLaDAConfig, LLaDAModelLM
from .tiny import TinyMDM, TinyMDMConfig
from .tokenizer import build_char_tokenizer

for _config, _model in [(TinyMDMConfig, TinyMDM), (LLaDAConfig, LLaDAModelLM), (DreamConfig, DreamModel)]:
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForMaskedLM.register(_config, _model, exist_ok=True)

__all__ = [
    "DiffusionGemmaLM",
    "DreamConfig",
    "DreamModel",
    "HFDiffusionLM",
    "KVCache",
    "LLaDAConfig",
    "LLaDAModelLM",
    "ModelTraits",
    "TinyMDM",
    "TinyMDMConfig",
    "build_char_tokenizer",
    "traits",
    "unwrap",
]
