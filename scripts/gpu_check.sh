#!/usr/bin/env bash
# The whole GPU check in one call, on a machine with a CUDA GPU: the `gpu` test tier (Unsloth 4-bit load of the
# Llama-3.2-1B shape, LoRA, 40 training steps, adapter save/reload, Unsloth's fast inference for evaluation, OOM
# message, data-parallel training on 2 GPUs where there are 2, varlen attention over packed rows against each
# example alone, the finetune pipeline with ZenML and MLflow), then the throughput benchmark on the 1B shape (full
# rows and the length mix in one invocation, against plain Unsloth and plain Unsloth + TRL packing; each backend
# on 2 GPUs where there are 2), the attention kernels alone, and the evaluate step's generation speed.
#
#   scripts/gpu_check.sh            # tests + 1B benchmarks
#   scripts/gpu_check.sh full       # also the 8B shape (full rows and the length mix) and more batchings
#   scripts/gpu_check.sh bench      # benchmarks only
#
# Results (logs, JUnit XML, one JSON per benchmark) go to $OUT (default: outputs/gpu-check). If a ./.whl folder
# of wheels is present (the offline GPU machine, see ../shared/gpu/README.md), they are unpacked first.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-quick}"
OUT="${OUT:-outputs/gpu-check}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -c "import glob,zipfile;[zipfile.ZipFile(f).extractall('/tmp/site') for f in sorted(glob.glob('.whl/*'))]"
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 ZENML_ANALYTICS_OPT_IN=false UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
status=0
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"

if [ "$mode" != "bench" ]; then
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -o addopts="" \
    -W ignore::DeprecationWarning --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log" | tail -n 40
  status=$((status | ${PIPESTATUS[0]}))
fi
bench() {  # name, then benchmark arguments
  local name="$1"; shift
  timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/train_throughput.py "$@" --json "$OUT/$name.json" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  sed -n '/^bf16 matmul/p;/^llama-/,$p' "$OUT/$name.log" | grep -v '^RESULT'
  return $rc
}
gpus=$(nvidia-smi -L | wc -l)
# One invocation: full 2048-token rows and the realistic length mix side by side, the pipeline's default batching
# and each explicit one, the plain-Unsloth loop (full rows) and plain Unsloth + TRL packing (the mix).
runs="reference:full,unsloth:full,unsloth-padded:full,hf:full,unsloth:mix,unsloth-packed:mix,unsloth-padded:mix"
runs="$runs,reference-trl-packed:mix"
if [ "$mode" = "full" ]; then runs="$runs,unsloth-padding-free:mix,unsloth-packed-novarlen:mix,hf:mix"; fi
if [ "$gpus" -ge 2 ]; then runs="$runs,hf-2gpu:full,unsloth-2gpu:full"; fi
bench bench-1b --shape llama-3.2-1b --runs "$runs" || status=1
for shape in llama-3.2-1b llama-3.1-8b; do  # the attention kernels alone, one layer over 8 packed rows
  timeout 300 python3 benchmarks/attention_kernels.py --shape "$shape" --json "$OUT/attention-$shape.json" \
    > "$OUT/attention-$shape.log" 2>&1 || status=1
  grep -v '^RESULT' "$OUT/attention-$shape.log" | tail -n 7
done
eval_work=$(mktemp -d)
for backend in hf unsloth; do  # the evaluate step's greedy generation; the 1B model is built once, in the first
  timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/eval_speed.py --shape llama-3.2-1b --backend "$backend" \
    --modes sequential,batched --work "$eval_work" --json "$OUT/eval-1b-$backend.json" > "$OUT/eval-1b-$backend.log" 2>&1
  rc=$?
  echo "eval speed, $backend:"; sed -n '/^mode /,/^{/p' "$OUT/eval-1b-$backend.log" | grep -v '^{'
  [ "$rc" = 0 ] || status=1
done
if [ "$mode" = "full" ]; then  # the 8B shape: full rows at 2 x 2048 against the plain loop, the mix at batch 4
  bench bench-8b --shape llama-3.1-8b --runs reference@2:full,unsloth@2:full,unsloth@4:mix,reference-trl-packed@4:mix \
    --steps 10 --warmup 3 || status=1
fi
exit "$status"
