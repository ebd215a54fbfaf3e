"""Helpers shared by the benchmark scripts and by tools/: where results go, which machine
and versions a result was measured on, which prompts fit a model, and the small timing
and random-tree helpers of the kernel benchmarks."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --- machine and versions ------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def slug(text: str) -> str:
    """A file-name-safe lower-case form: ``NVIDIA H200`` -> ``nvidia-h200``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def package_version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001
        return None


def git(*cmd) -> str | None:
    """``git <cmd>`` in this checkout: its stdout, or None (no git, not a checkout)."""
    try:
        r = subprocess.run(["git", *cmd], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def environment(device, *, command: str, argv: list[str] | None = None) -> dict:
    """What a result file states about where and how it was measured: hardware, versions
    (and the commit, ``+dirty`` with uncommitted changes), the command, the date."""
    import transformers

    try:
        import specdec

        sd_version = specdec.__version__
    except Exception as e:  # noqa: BLE001
        sd_version = f"import failed: {e}"
    dev = torch.device(device)
    hw = {"device": str(dev), "device_name": device_name(dev), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
          "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
          "python": platform.python_version()}
    if dev.type == "cuda":
        prop = torch.cuda.get_device_properties(dev)
        hw.update(gpu=prop.name, gpu_memory_gib=round(prop.total_memory / 2**30, 1),
                  compute_capability=f"{prop.major}.{prop.minor}", cuda=torch.version.cuda)
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"hardware": hw,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "triton": package_version("triton"), "specdec": sd_version,
                         "specdec_commit": (commit + ("+dirty" if dirty else "")) if commit else None},
            "command": command, "argv": argv, "date": _dt.datetime.now().isoformat(timespec="seconds")}


def versions(*extra: str) -> dict:
    """torch, CUDA, Python, triton, transformers and the ``extra`` modules' versions; a
    module that fails to import is reported as absent (with why), never fatal."""
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for mod in ("triton", "transformers", *extra):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            info[mod] = f"absent ({type(e).__name__}: {e})"
    return info


# --- prompts -------------------------------------------------------------------------------------------

def write_run(folder: Path, stem: str, data: dict, markdown: str) -> None:
    """``stem``.json (``data``) and ``stem``.md (``markdown``) in ``folder``; prints the table."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    (folder / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {folder / stem}.json and .md")


def ints(text: str) -> list[int]:
    """``"1,4,16"`` -> [1, 4, 16]."""
    return [int(x) for x in str(text).split(",") if x.strip()]


def context_length(model) -> int:
    cfg = model.config
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "max_position_embeddings", None) or 1 << 30


def fit_prompts(prompts: dict, model, *, max_new_tokens: int, max_prompt_tokens: int | None = None
                ) -> tuple[dict, dict]:
    """(kept, skipped ids) per subset: drop the prompts that do not fit the model's context
    with ``max_new_tokens`` (or are longer than ``max_prompt_tokens``)."""
    max_prompt = context_length(model) - max_new_tokens - 16
    if max_prompt_tokens:
        max_prompt = min(max_prompt, max_prompt_tokens)
    kept, skipped = {}, {}
    for subset, items in prompts.items():
        too_long = [p.id for p in items if p.prompt_ids.shape[1] > max_prompt]
        if too_long:
            skipped[subset] = too_long
            print(f"{subset}: skipping {len(too_long)} prompts longer than {max_prompt} tokens")
        if len(too_long) < len(items):
            kept[subset] = [p for p in items if p.prompt_ids.shape[1] <= max_prompt]
    if not kept:
        raise SystemExit("no prompts to run (check --datasets, --limit, --max-prompt-tokens)")
    return kept, skipped


# --- timing and trees ----------------------------------------------------------------------------------

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def warm_gpu(seconds: float = 0.5) -> None:
    """Run matrix products for a moment so clocks are up before the first timing."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def random_tree(n: int, g: torch.Generator):
    """(parents list, depth [n], ancestor mask [n, n] bool): one root, each other node's
    parent among the previous four nodes (bushy near the root, like the drafters' trees)."""
    from specdec.tree import TokenTree

    parents = [-1] + [int(torch.randint(max(0, i - 4), i, (), generator=g)) for i in range(1, n)]
    tree = TokenTree(torch.zeros(n, dtype=torch.long), torch.tensor(parents))
    return parents, tree.depth.clone(), tree.ancestor_mask.clone()


def random_tree_mask(n: int, seed: int) -> torch.Tensor:
    """Ancestor mask [n, n] bool of a random tree whose first nodes may also hang from the
    last committed token (several roots), each other node's parent among the previous four."""
    from specdec.tree import TokenTree

    g = torch.Generator().manual_seed(seed)
    parents = [-1] + [int(torch.randint(max(-1, i - 4), i, (), generator=g)) for i in range(1, n)]
    return TokenTree(torch.zeros(n, dtype=torch.long), torch.tensor(parents)).ancestor_mask
