"""The benchmark suite end to end on a tiny random Llama and a two-prompt dataset."""
import importlib.util
import json
import sys
from pathlib import Path

from conftest import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives in the source checkout


def test_bench_suite_writes_results(tmp_path):
    from benchmarks.run import main

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    return x + {i}\n\ndef g(", "test": "",
             "entry_point": f"f{i}", "canonical_solution": ""} for i in range(2)]
    (data / "humaneval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results" / "run"
    rc = main(["--datasets", "humaneval", "--data-dir", str(data), "--limit", "2", "--max-new-tokens", "8",
               "--device", "cpu", "--dtype", "float32", "--methods", "hf_greedy,specdec_ngram",
               "--out", str(out)], model=tiny_model("llama"))
    assert rc == 0
    js = list(out.glob("*.json"))
    md = list(out.glob("*.md"))
    assert len(js) == 1 and len(md) == 1
    res = json.loads(js[0].read_text())
    assert res["settings"]["max_new_tokens"] == 8 and res["settings"]["batch_size"] == 1
    assert res["versions"]["torch"] and res["hardware"]["cpu"]
    hum = res["summary"]["humaneval"]
    assert set(hum) == {"hf_greedy", "specdec_ngram"}
    assert hum["specdec_ngram"]["exact_match"] == 1.0 and hum["specdec_ngram"]["compared"] == 2
    assert hum["specdec_ngram"]["mean_accepted_length"] >= 1.0
    assert hum["hf_greedy"]["tokens_per_s"] > 0
    text = md[0].read_text()
    assert "specdec_ngram" in text and "hf_greedy" in text
    assert (out.parent / "LATEST.md").exists() and md[0].name in (out.parent / "LATEST.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert len(list(out.glob("*.png"))) == 2


def test_prompt_formats_from_shared_data():
    import pytest

    from benchmarks import datasets

    if not datasets.DEFAULT_DATA_DIR.is_dir():
        pytest.skip(f"{datasets.DEFAULT_DATA_DIR} not present")
    sel = datasets.select(["humaneval", "gsm8k", "mbpp", "spec_bench"], limit=None)
    assert len(sel["humaneval"]) == 164 and sel["humaneval"][0][0] == "HumanEval/0"
    assert len(sel["mbpp"]) == 500 and sel["mbpp"][0][0] == "mbpp/11" and sel["mbpp"][-1][0] == "mbpp/510"
    mbpp = sel["mbpp"][0][1]
    assert mbpp.count("[BEGIN]") == 4 and mbpp.count("[DONE]") == 3 and mbpp.endswith("\n[BEGIN]")
    assert mbpp.startswith("You are an expert Python programmer, and here is your task: ")
    q = sel["gsm8k"][0][1]
    assert q.startswith("Question: ") and q.endswith("\nAnswer:") and len(sel["gsm8k"]) == 1319
    cats = {k: len(v) for k, v in sel.items() if k.startswith("spec_bench/")}
    assert cats == {f"spec_bench/{c}": 80 for c in datasets.SPEC_BENCH_CATEGORIES}
    lim = datasets.select(["spec_bench"], limit=12)
    assert sum(len(v) for v in lim.values()) == 12


def test_compare_reports_first_difference():
    from benchmarks.run import compare

    assert compare([1, 2, 3], [1, 2, 3]) == {"match": True}
    d = compare([1, 2, 3, 4], [1, 9, 3])
    assert d["match"] is False and d["first_diff"] == 1 and d["n_diff"] == 2


def test_attention_heuristic_against_the_saved_h200_tuning():
    """The tree-attention launch heuristic, replayed on the committed H200 tuning run
    (in-model timings of every config x split count): within 20% of the best candidate
    on average and 1.6x at worst (the heuristic it replaced: 1.68x on average)."""
    from pathlib import Path

    from benchmarks.tune_layer_kernels import evaluate_heuristic

    path = Path(__file__).parent.parent / "benchmarks/results/2026-12-01-h200-s3/tune_layer_kernels_h200.json"
    ev = evaluate_heuristic(str(path))
    assert ev["cases"] == 36
    assert ev["geomean_vs_best"] < 1.2 and ev["worst_vs_best"] < 1.6, ev["geomean_vs_best"]
    assert ev["tuned_run_auto_geomean_vs_best"] > 1.5
