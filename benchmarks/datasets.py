"""Benchmark prompts: HumanEval, MBPP, GSM8K and Spec-Bench, read from local JSON Lines files.

The files and the way each prompt is formed are described in ``shared/data/README.md``;
``load(names, tokenizer, ...)`` returns ``{subset: [Prompt(id, prompt_ids), ...]}`` where a
subset is a dataset name or, for Spec-Bench, ``spec_bench/<category>`` (the eight MT-bench
categories are grouped as ``spec_bench/multi_turn``, as Spec-Bench reports them).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# ../shared/data from the repo root, unless SPECDEC_DATA_DIR names another folder
DEFAULT_DATA_DIR = Path(os.environ.get("SPECDEC_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")

FILES = {"humaneval": "humaneval.jsonl", "gsm8k": "gsm8k_test.jsonl", "mbpp": "mbpp.jsonl",
         "spec_bench": "spec_bench.jsonl"}
DATASETS = tuple(FILES)
# chat="auto": which datasets are wrapped in the chat template (when the tokenizer has one):
# Spec-Bench always, GSM8K and MBPP for instruct models only, HumanEval never (raw completion).
CHAT_BY_DEFAULT = {"humaneval": "never", "gsm8k": "instruct", "mbpp": "instruct", "spec_bench": "always"}
SPEC_BENCH_SINGLE = ("translation", "summarization", "qa", "math_reasoning", "rag")
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SPEC_BENCH_CATEGORIES = SPEC_BENCH_SINGLE + ("multi_turn",)
MBPP_TEST_IDS = range(11, 511)  # the test split, task_ids 11..510
MBPP_SHOT_IDS = (2, 3, 4)  # 3-shot exemplars (Austin et al., 2021)


@dataclass
class Prompt:
    id: str
    prompt_ids: torch.Tensor  # [1, T] int64
    text: str  # the text before tokenisation (chat template not applied)

    def __iter__(self):  # unpacks as (id, prompt_ids)
        return iter((self.id, self.prompt_ids))


def data_dir_or_fail(data_dir: str | Path | None) -> Path:
    path = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"benchmark data folder {path} not found; pass --data-dir DIR, a folder holding "
                                f"{', '.join(FILES.values())} (see shared/data/README.md)")
    return path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; pass --data-dir DIR, a folder holding {path.name}")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- prompt texts ------------------------------------------------------------------------------------

def humaneval_texts(records: list[dict]) -> list[tuple[str, str]]:
    return [(r["task_id"], r["prompt"]) for r in records]


def gsm8k_texts(records: list[dict]) -> list[tuple[str, str]]:
    return [(f"gsm8k/{i}", f"Question: {r['question']}\nAnswer:") for i, r in enumerate(records)]


def _mbpp_task(r: dict) -> str:
    tests = "\n".join(r["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {r['text']} "
            f"Your code should pass these tests:\n\n{tests}")


def mbpp_texts(records: list[dict]) -> list[tuple[str, str]]:
    by_id = {int(r["task_id"]): r for r in records}
    missing = [i for i in MBPP_SHOT_IDS if i not in by_id]
    if missing:
        raise ValueError(f"mbpp.jsonl lacks the few-shot exemplar task_ids {missing}")
    shots = "".join(f"{_mbpp_task(by_id[i])}\n[BEGIN]\n{by_id[i]['code']}\n[DONE]\n" for i in MBPP_SHOT_IDS)
    return [(f"mbpp/{i}", f"{shots}{_mbpp_task(by_id[i])}\n[BEGIN]") for i in MBPP_TEST_IDS if i in by_id]


def spec_bench_texts(records: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """{category: [(id, first turn)]}; MT-bench categories interleaved into 'multi_turn'."""
    out: dict[str, list[tuple[str, str]]] = {c: [] for c in SPEC_BENCH_CATEGORIES}
    mt: dict[str, list[tuple[str, str]]] = {c: [] for c in MT_BENCH}
    for r in records:
        item = (f"spec_bench/{r['question_id']}", r["turns"][0])
        cat = r["category"]
        if cat in out:
            out[cat].append(item)
        else:
            mt.setdefault(cat, []).append(item)
    # round-robin over the MT-bench categories so a --limit still covers all of them
    queues = [q for q in mt.values() if q]
    while any(queues):
        for q in queues:
            if q:
                out["multi_turn"].append(q.pop(0))
    return {c: v for c, v in out.items() if v}


# --- tokenisation ------------------------------------------------------------------------------------

def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode(tokenizer, text: str, chat: bool) -> torch.Tensor:
    """[1, T] prompt ids; wrapped in the chat template as one user turn when ``chat``."""
    if chat:
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        ids = out["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    ids = torch.as_tensor(ids, dtype=torch.long)
    return ids if ids.dim() == 2 else ids[None]


def use_chat(dataset: str, tokenizer, mode: str = "auto", instruct: bool = True) -> bool:
    """Whether ``dataset``'s prompts get the chat template (see CHAT_BY_DEFAULT for "auto")."""
    if mode == "never":
        return False
    if not has_chat_template(tokenizer):
        if mode == "always":
            raise ValueError("--chat always: the tokenizer has no chat template")
        return False
    rule = CHAT_BY_DEFAULT[dataset]
    return mode == "always" or rule == "always" or (rule == "instruct" and instruct)


def parse_names(spec: str | list[str]) -> list[str]:
    """'humaneval,spec_bench/qa' -> validated list (dataset or spec_bench/<category>)."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    for n in names:
        base, _, cat = n.partition("/")
        if base not in FILES or (cat and (base != "spec_bench" or cat not in SPEC_BENCH_CATEGORIES)):
            raise ValueError(f"unknown dataset {n!r}; choose from {', '.join(DATASETS)} or "
                             f"spec_bench/<{'|'.join(SPEC_BENCH_CATEGORIES)}>")
    return names


def select(names, *, data_dir=None, limit: int | None = None,
           per_category: int | None = None) -> dict[str, list[tuple[str, str]]]:
    """{subset: [(id, text)]} for the given datasets, before tokenisation.

    ``limit``: prompts per dataset (the first ones, in file order). For Spec-Bench it
    is spread over its six categories unless ``per_category`` is given."""
    root = data_dir_or_fail(data_dir)
    out: dict[str, list[tuple[str, str]]] = {}
    for name in parse_names(names):
        base, _, only_cat = name.partition("/")
        records = read_jsonl(root / FILES[base])
        if base == "spec_bench":
            cats = spec_bench_texts(records)
            if only_cat:
                cats = {only_cat: cats.get(only_cat, [])}
            n = per_category if per_category is not None else (
                limit if only_cat or limit is None else math.ceil(limit / len(cats)))
            out.update({f"spec_bench/{c}": items[:n] for c, items in cats.items()})
        else:
            texts = {"humaneval": humaneval_texts, "gsm8k": gsm8k_texts, "mbpp": mbpp_texts}[base](records)
            out[base] = texts[:limit] if limit is not None else texts
    return out


def tokenize(selected: dict[str, list[tuple[str, str]]], tokenizer, chat: str = "auto",
             instruct: bool = True) -> dict[str, list[Prompt]]:
    """{subset: [Prompt(id, prompt_ids [1, T], text)]}, chat template per ``use_chat``."""
    out = {}
    for subset, items in selected.items():
        chat_on = use_chat(subset.partition("/")[0], tokenizer, chat, instruct)
        out[subset] = [Prompt(pid, encode(tokenizer, text, chat_on), text) for pid, text in items]
    return out


def load(names, tokenizer, *, data_dir=None, limit: int | None = None, per_category: int | None = None,
         chat: str = "auto", instruct: bool = True) -> dict[str, list[Prompt]]:
    """``select`` then ``tokenize``: {subset: [Prompt]} (unpacks as (id, prompt_ids))."""
    return tokenize(select(names, data_dir=data_dir, limit=limit, per_category=per_category), tokenizer, chat,
                    instruct)
