"""mmgpt: vision-language models (ViT encoder + GPT decoder with cross-modal attention)."""

from mmgpt.build import build_model
from mmgpt.config import MMGPTConfig
from mmgpt.model import MMGPTModel, MMGPTOutput
from mmgpt.processor import MMGPTProcessor, train_bpe_tokenizer

__all__ = ["MMGPTConfig", "MMGPTModel", "MMGPTOutput", "MMGPTProcessor", "build_model", "train_bpe_tokenizer"]
__version__ = "0.1.0"
