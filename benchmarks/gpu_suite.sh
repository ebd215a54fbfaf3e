#!/usr/bin/env bash
# The GPU checks of the fast path, stage by stage, each log and result under OUT.
#
#   benchmarks/gpu_suite.sh OUT build tests latency      # no model file needed
#   SPECDEC_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf \
#     benchmarks/gpu_suite.sh OUT realtests real-fp32 real-bf16
#   SPECDEC_GEMMA_GGUF=/path/gemma-3-270m-q4_k_m.gguf benchmarks/gpu_suite.sh OUT gemma-bf16 gemma-t07
#
# build      pip install -e . (the native extension) and import checks
# tests      every test marked `gpu` except the real-model ones
# latency    benchmarks.bench_step_latency (random-weight SmolLM2 and Llama-3-8B shapes)
# latency-unfused  the same without the fused RMSNorm / RoPE kernels (SPECDEC_FUSED_KERNELS=0)
# profile    tools/profile_step.py: per-kernel device time of a verify step vs tree size
# realtests  tests/test_real_model_gpu.py (fast path == generic == transformers, fp32)
# real-fp32  benchmarks.run on the real SmolLM2, fp32: speed and exact match vs transformers
# real-bf16  the same in bf16, exact match vs specdec's own plain decoding
# real-t07   the same in bf16 sampled at temperature 0.7 (speed and tau; no exact match)
# sweep      tools/sweep_adaptive.py on the real SmolLM2 in bf16 (adaptive vs fixed budgets;
#            SWEEP_DTYPE=float32: every setting's greedy output identical, so per-dataset rows
#            compare the same text, which bf16 near-ties do not guarantee)
# gemma-bf16 / gemma-t07  real-bf16 / real-t07 on Gemma-3-270M (SPECDEC_GEMMA_GGUF)
# Set LIMIT / PER_CATEGORY / NEW_TOKENS to size the benchmark runs (defaults 5 / 2 / 128),
# METHODS to replace the benchmark methods, SWEEP_DRAFTER / SWEEP_NODES / SWEEP_LIMIT /
# SWEEP_REPEATS / SWEEP_DTYPE / SWEEP_GRID (controller arms) / SWEEP_VARIANTS (controller options, JSON) for the sweep, TAG to name the latency files (default: the GPU's model).
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT STAGE...}; shift
mkdir -p "$out"
limit=${LIMIT:-5}; per_cat=${PER_CATEGORY:-2}; new=${NEW_TOKENS:-128}
data=${SPECDEC_DATA_DIR:-../shared/data}
methods=${METHODS:-'hf_greedy,hf_prompt_lookup_10,specdec_none,specdec_compact_none,specdec_ngram,specdec_recycling,specdec_ngram+recycling'}
tag=${TAG:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oiE 'h100|h200|a100|l40s|b200' | tr 'A-Z' 'a-z')}
tag=${tag:-gpu}

bench() {  # model-file dtype match-reference tag temperature
  timeout "${BENCH_TIMEOUT:-280}" python -m benchmarks.run --model "$1" --device cuda --dtype "$2" \
    --data-dir "$data" --datasets humaneval,gsm8k,spec_bench --limit "$limit" --per-category "$per_cat" \
    --max-new-tokens "$new" --adaptive --methods "$methods" --match-reference "$3" --tag "$4" \
    --temperature "$5" --out "$out/real" > "$out/real-$4.log" 2>&1
  echo "real-$4 rc=$?"; tail -25 "$out/real-$4.log"
}

for stage in "$@"; do
  t0=$(date +%s)
  case $stage in
    build)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
      MAX_JOBS=16 python -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1
      echo "build rc=$?"; tail -3 "$out/build.log"
      python -c "import torch, triton, transformers, specdec; from specdec.ops import backend; \
print(torch.__version__, triton.__version__, transformers.__version__, backend.describe())" 2>&1 | tee "$out/env.txt" ;;
    tests)
      timeout "${TESTS_TIMEOUT:-240}" python -m pytest -q -m gpu -rfEs --tb=short --ignore=tests/test_real_model_gpu.py \
        tests > "$out/tests.log" 2>&1
      echo "tests rc=$?"; grep -E "passed|failed|error" "$out/tests.log" | tail -15
      # not marked gpu (they also run on CPU), but their fp16/bf16 cases need CUDA
      timeout 120 python -m pytest -q -rfE --tb=short tests/test_fused_kernels.py > "$out/tests-fused.log" 2>&1
      echo "fused-kernel tests rc=$?"; tail -3 "$out/tests-fused.log" ;;
    latency)
      timeout "${LATENCY_TIMEOUT:-200}" python -m benchmarks.bench_step_latency --out "$out" --tag "$tag" \
        > "$out/latency.log" 2>&1
      echo "latency rc=$?"; tail -40 "$out/latency.log" ;;
    latency-unfused)
      timeout "${LATENCY_TIMEOUT:-200}" python -m benchmarks.bench_step_latency --no-fused --out "$out" \
        --tag "${tag}_unfused" > "$out/latency-unfused.log" 2>&1
      echo "latency-unfused rc=$?"; tail -40 "$out/latency-unfused.log" ;;
    profile)
      timeout "${PROFILE_TIMEOUT:-150}" python -m tools.profile_step --out "$out" --tag "$tag" \
        > "$out/profile.log" 2>&1
      echo "profile rc=$?"; tail -50 "$out/profile.log" ;;
    realtests)
      timeout "${TESTS_TIMEOUT:-240}" python -m pytest -q -rfEs --tb=short tests/test_real_model_gpu.py \
        > "$out/realtests.log" 2>&1
      echo "realtests rc=$?"; tail -15 "$out/realtests.log" ;;
    real-fp32) bench "$SPECDEC_SMOLLM2_GGUF" float32 hf_greedy fp32 0 ;;
    real-bf16) bench "$SPECDEC_SMOLLM2_GGUF" bfloat16 specdec_none bf16 0 ;;
    real-t07) bench "$SPECDEC_SMOLLM2_GGUF" bfloat16 hf_greedy bf16-t07 0.7 ;;
    gemma-bf16) bench "$SPECDEC_GEMMA_GGUF" bfloat16 specdec_none gemma-bf16 0 ;;
    gemma-t07) bench "$SPECDEC_GEMMA_GGUF" bfloat16 hf_greedy gemma-bf16-t07 0.7 ;;
    sweep)
      timeout "${SWEEP_TIMEOUT:-280}" python -m tools.sweep_adaptive --model "$SPECDEC_SMOLLM2_GGUF" --device cuda \
        --dtype "${SWEEP_DTYPE:-bfloat16}" --data-dir "$data" --datasets "${SWEEP_DATASETS:-humaneval,gsm8k,mbpp,spec_bench}" \
        --limit "${SWEEP_LIMIT:-3}" --max-new-tokens "$new" --drafter "${SWEEP_DRAFTER:-ngram+recycling}" \
        --nodes "${SWEEP_NODES:-1,4,16,64}" --depths 8 --repeats "${SWEEP_REPEATS:-1}" --tag "$tag" \
        ${SWEEP_GRID:+--grid "$SWEEP_GRID"} ${SWEEP_VARIANTS:+--variants "$SWEEP_VARIANTS"} \
        --out "$out/sweep" > "$out/sweep-${SWEEP_DRAFTER:-ngram+recycling}.log" 2>&1
      echo "sweep rc=$?"; tail -30 "$out/sweep-${SWEEP_DRAFTER:-ngram+recycling}.log" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "[$stage: $(( $(date +%s) - t0 )) s]"
done
