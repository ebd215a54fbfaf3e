"""The benchmark suite end to end on a tiny random Llama and a two-prompt dataset."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_model

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


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
    if importlib.util.find_spec("matplotlib") is not None:
        assert len(list(out.glob("*.png"))) == 2


@pytest.mark.parametrize("mode", ["on", "off"])
def test_prompt_warmup_runs_each_method_for_one_token(tmp_path, monkeypatch, mode):
    from benchmarks import methods as methods_mod
    from benchmarks import run as run_mod

    one_token = []
    real = methods_mod.SpecdecMethod.run

    def counting(self, ctx, ids, seed, max_new_tokens=None):
        if max_new_tokens == 1:
            one_token.append(self.name)
        return real(self, ctx, ids, seed, max_new_tokens)

    monkeypatch.setattr(methods_mod.SpecdecMethod, "run", counting)
    out = tmp_path / "out"
    rc = run_mod.main(["--datasets", "humaneval", "--data-dir", str(_humaneval_dir(tmp_path, 2)), "--limit", "2",
                       "--max-new-tokens", "4", "--device", "cpu", "--dtype", "float32", "--methods",
                       "specdec_none,specdec_ngram", "--prompt-warmup", mode, "--no-plots", "--out", str(out)],
                      model=tiny_model("llama"))
    res = json.loads(next(out.glob("*.json")).read_text())
    assert rc == 0 and res["settings"]["prompt_warmup"] == (mode == "on")
    assert sorted(one_token) == (sorted(["specdec_none", "specdec_ngram"] * 2) if mode == "on" else [])
    assert all(r["new_tokens"] == 4 for r in res["records"])  # the timed runs are the full ones


def _humaneval_dir(tmp_path, n):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    return x * {i}\n\ndef g(", "test": "",
             "entry_point": f"f{i}", "canonical_solution": ""} for i in range(n)]
    (data / "humaneval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_shards_and_skip_measured_merge_into_one_run(tmp_path):
    """Two shards cover disjoint prompts; a third run with --skip-measured runs only what is
    left; merging the parts gives one table over every prompt, and overlaps are refused."""
    import pytest

    from benchmarks import merge
    from benchmarks.run import main

    data = _humaneval_dir(tmp_path, 5)
    model = tiny_model("llama")
    common = ["--datasets", "humaneval", "--data-dir", str(data), "--max-new-tokens", "6", "--device", "cpu",
              "--dtype", "float32", "--methods", "hf_greedy,specdec_ngram", "--no-plots"]

    def run(out, *extra):
        assert main(common + ["--out", str(tmp_path / out), *extra], model=model) == 0
        return json.loads(next((tmp_path / out).glob("*.json")).read_text())

    a = run("a", "--limit", "4", "--shard", "0/2")
    b = run("b", "--limit", "4", "--shard", "1/2")
    ids = lambda res: {r["id"] for r in res["records"] if r["method"] == "hf_greedy"}  # noqa: E731
    assert ids(a) == {"HumanEval/0", "HumanEval/2"} and ids(b) == {"HumanEval/1", "HumanEval/3"}
    files = [str(next((tmp_path / d).glob("*.json"))) for d in ("a", "b")]
    c = run("c", "--limit", "5", "--skip-measured", *files)
    assert ids(c) == {"HumanEval/4"}
    with pytest.raises(SystemExit, match="nothing left"):
        run("d", "--limit", "4", "--skip-measured", *files)

    files.append(str(next((tmp_path / "c").glob("*.json"))))
    assert merge.main(files + ["--out", str(tmp_path / "m"), "--tag", "all", "--no-plots"]) == 0
    m = json.loads(next((tmp_path / "m").glob("*.json")).read_text())
    assert m["settings"]["prompts"] == {"humaneval": 5} and len(m["parts"]) == 3
    assert sorted({r["part"] for r in m["records"]}) == [0, 1, 2]
    assert m["summary"]["humaneval"]["specdec_ngram"]["compared"] == 5
    assert m["summary"]["humaneval"]["specdec_ngram"]["exact_match"] == 1.0
    assert "merged from 3 parts" in next((tmp_path / "m").glob("*.md")).read_text()

    assert merge.main([files[0], files[0], "--out", str(tmp_path / "x"), "--no-plots"]) == 2  # measured twice
    partial = json.loads(Path(files[2]).read_text())  # an interrupted part: HumanEval/4 lacks a method
    partial["records"] = [r for r in partial["records"] if r["method"] == "hf_greedy"]
    m2 = merge.merge([partial, *(json.loads(Path(f).read_text()) for f in files)], ["p", "a", "b", "c"])
    assert len(m2["records"]) == len(m["records"]) and m2["dropped_partial_prompts"] == [
        {"prompt": ["humaneval", "HumanEval/4"], "part": 0, "records": 1}]
    # the partial prompt rerun with only the method it lacked (plus the reference): neither
    # part's methods cover the other's, and the interrupted part's partial prompt yields
    partial["interrupted"] = True
    rerun = json.loads(Path(files[2]).read_text())
    rerun["records"] = [r for r in rerun["records"] if r["method"] == "specdec_ngram"]
    partial["records"] = [dict(r, method="hf_prompt_lookup_10") for r in partial["records"]] + partial["records"]
    m3 = merge.merge([partial, rerun], ["p", "rerun"])
    assert [r["method"] for r in m3["records"]] == ["specdec_ngram"] and m3["dropped_partial_prompts"] == [
        {"prompt": ["humaneval", "HumanEval/4"], "part": 0, "records": 2}]
    partial["interrupted"] = False  # not the partial last prompt of a stopped run: an error
    with pytest.raises(ValueError, match="measured in p, rerun"):
        merge.merge([partial, rerun], ["p", "rerun"])
    other = json.loads(Path(files[1]).read_text())
    other["settings"]["max_new_tokens"] = 7
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="max_new_tokens"):
        merge.merge([a, json.loads(bad.read_text())], ["a", "bad"])


def test_shard_argument_is_checked():
    import pytest

    from benchmarks.run import parse_shard

    assert parse_shard(None) == (0, 1) and parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


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


def test_attention_heuristic_against_the_saved_h200_tuning(monkeypatch):
    """The tree-attention launch heuristic, replayed on the committed H200 tuning run
    (tools/tune_layer_kernels.py: in-model timings of every config x split count): within
    20% of the best candidate on average and 1.6x at worst (the heuristic it replaced:
    1.68x on average). Runs anywhere: the heuristic is asked as if on an H200 (132 SMs)."""
    from specdec.kernels import tree_attention as tk

    shapes = {"smollm2": (9, 3, 64), "llama3-8b": (32, 8, 128)}  # (Hq, Hkv, D) as tuned
    cases = json.loads((RESULTS / "2026-12-01-h200-s3/tune_layer_kernels_h200.json").read_text())["attention"]
    monkeypatch.setattr(tk, "_device_info", lambda device: (132, 227 * 1024))
    dev = torch.device("cuda")
    ratios, old = [], []
    for c in cases:
        hq, hkv, d = shapes[c["shape"]]
        rows = c["n"] * hq // hkv
        s = tk.default_num_splits(rows, hkv, c["L"], d, dev)
        cfg = tk.block_config(rows, d, 2, dev, c["L"], s)
        s = max(x for x in (1, 2, 4, 8, 16, 32) if x <= min(s, max(1, c["L"] // 16)))  # as measured
        key = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_stages"], s)
        got = next((t["us"] for t in c["timings"]
                    if (t["BLOCK_M"], t["BLOCK_N"], t["num_stages"], t["splits"]) == key), None)
        if got is not None:
            ratios.append(got / c["best"]["us"])
            old.append(c["auto_us"] / c["best"]["us"])
    geomean = lambda xs: math.exp(sum(map(math.log, xs)) / len(xs))  # noqa: E731
    assert len(ratios) == 36
    assert geomean(ratios) < 1.2 and max(ratios) < 1.6, geomean(ratios)
    assert geomean(old) > 1.5
