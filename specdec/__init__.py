"""specdec: lossless speculative decoding for Hugging Face causal language models."""
from .api import accelerate, dualdec
from .config import SamplingParams, TreeBudget
from .drafters import DraftRequest, Drafter, ModelDrafter, NgramDrafter, NoDrafter, VerifyResult
from .generate import GenerationOutput, GenerationStats, generate
from .streaming import IncrementalDetokenizer, TextStreamer
from .tree import TokenTree

__version__ = "0.1.0"
__all__ = ["generate", "accelerate", "dualdec", "GenerationOutput", "GenerationStats", "SamplingParams",
           "TreeBudget", "TokenTree", "Drafter", "DraftRequest", "VerifyResult", "NoDrafter",
           "ModelDrafter", "NgramDrafter", "IncrementalDetokenizer", "TextStreamer"]
