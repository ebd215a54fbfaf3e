"""benchmarks/bench_ops.py runs on CPU (tiny sizes) and writes its table and JSON."""
import json

from benchmarks import bench_ops


def test_bench_ops_quick_cpu(tmp_path):
    assert bench_ops.main(["--device", "cpu", "--quick", "--sizes", "3", "7", "--history", "120",
                           "--out", str(tmp_path), "--tag", "t"]) == 0
    data = json.loads((tmp_path / "ops_cpu_t.json").read_text())
    rows = data["rows"]
    assert {r["op"] for r in rows} == {"greedy", "rejection", "compact_kv", "ngram step", "ngram prefill"}
    assert {r["size"] for r in rows if r["op"] == "greedy"} == {3, 7}
    assert all(r["us"] > 0 for r in rows)
    assert "| greedy | 3 | greedy_accept (host) |" in (tmp_path / "ops_cpu_t.md").read_text()
