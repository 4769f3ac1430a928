"""mmgpt: vision-language models (ViT encoder + GPT decoder with cross-modal attention).

Names are imported lazily, so `mmgpt --help` and the CLI's error paths start without torch. `import mmgpt`
(outside the `mmgpt` command) registers mmgpt with transformers' Auto classes (mmgpt.hf_interop).
"""

import os
import sys
from importlib import import_module

_EXPORTS = {
    "MMGPTConfig": "mmgpt.config",
    "MMGPTModel": "mmgpt.model",
    "MMGPTOutput": "mmgpt.model",
    "MMGPTProcessor": "mmgpt.processor",
    "train_bpe_tokenizer": "mmgpt.processor",
    "build_model": "mmgpt.build",
    "load": "mmgpt.api",
    "VisionLanguagePipeline": "mmgpt.api",
}
__all__ = [
    "MMGPTConfig",
    "MMGPTModel",
    "MMGPTOutput",
    "MMGPTProcessor",
    "VisionLanguagePipeline",
    "build_model",
    "load",
    "train_bpe_tokenizer",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmgpt' has no attribute {name!r}")


def _started_as_cli() -> bool:
    """The `mmgpt` command (its console script): it needs no Auto classes and keeps starting without torch."""
    return os.path.basename(sys.argv[0] if sys.argv else "") == "mmgpt"


# `import mmgpt` lets transformers load mmgpt folders: AutoConfig / AutoModel / AutoModelForImageTextToText /
# AutoProcessor and pipeline("image-text-to-text") (mmgpt.hf_interop).
if not _started_as_cli():
    from mmgpt.hf_interop import register as _register

    _register()
