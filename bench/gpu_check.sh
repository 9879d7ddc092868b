#!/usr/bin/env bash
# The GPU checks, in one call on a lent GPU machine (see the README's benchmark section):
# tests/test_gpu_e2e.py, bench/gpu_score.py (MiniLM- and bert-base-shaped, this tree's code and
# the bundle's "before" commit's) and bench/finetune.py on CUDA (the recipe against tuneq).
#
#   .venv/bin/python bench/gpu_bundle.py                        # here: .gpucheck/ and .whl/
#   device run, carry [".gpucheck", ".whl"]: bash bench/gpu_check.sh [STEP ...]
#
# STEPs, in the order given (default: test score finetune before): test (the GPU test), score
# (bench/gpu_score.py, with --explore), finetune (bench/finetune.py --gpu), before (scoring
# with the bundle's earlier commit), quality (bench/quality.py's attention-dropout comparison),
# quality_and_test (the two at once).
#
# Each step has its own time limit and the next runs whatever the last gave; logs and results
# go to $OUT (the device tool's folder that comes back).
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() { echo "=== $(date +%T) $*"; }

step install
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/tuneq . \
    || exit 1
if [ -f .gpucheck/before.tar.gz ]; then
    mkdir -p /tmp/before-src && tar -xzf .gpucheck/before.tar.gz -C /tmp/before-src
    python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/before \
        /tmp/before-src || exit 1
fi
export PYTHONPATH=/tmp/tuneq:/tmp/site
python3 -c "import tarfile; tarfile.open('.gpucheck/rows.tar.xz').extractall('/tmp', filter='data')"
cat .gpucheck/commit
nvidia-smi -L
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"

run_test() {
step tests/test_gpu_e2e.py
timeout 240 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_e2e.py \
    > "$OUT/gpu_e2e.log" 2>&1
echo "exit $?"
grep -E "passed|failed|error|GPU (fp32|bf16) vs" "$OUT/gpu_e2e.log" | tail -8
}

run_score() {
step bench/gpu_score.py
timeout 200 python3 bench/gpu_score.py --data /tmp/imdb-test-6000.csv --rows 6000 \
    ${SCORE_ARGS:---batch-tokens 32768,65536 --explore} --out "$OUT/gpu_score.json" > /dev/null 2> "$OUT/gpu_score.err"
echo "exit $?"
grep -E "^/tmp|matmul" "$OUT/gpu_score.err" | cut -c1-300
}

run_finetune() {
step bench/finetune.py --gpu
timeout 240 python3 bench/finetune.py --gpu --data .gpucheck/imdb-ft --model .gpucheck/minilm \
    --variants tuneq,tuneq_fp32 --name finetune_gpu > "$OUT/finetune_gpu.log" 2>&1
echo "exit $?"
cp bench/results/finetune_gpu.json "$OUT/" 2>/dev/null
grep -E "^(recipe|tuneq|matmul)" "$OUT/finetune_gpu.log" | cut -c1-400
}

# The quality benchmark's attention-dropout comparison on the rows gpu_bundle.py exported: six
# processes share the GPU (MiniLM at batch 8 leaves it mostly idle), each with its own pairs.
run_quality() {
step "bench/quality.py --compare attention_dropout=0, 6 processes"
for shard in 0 1 2 3 4 5; do
    OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false timeout "${QUALITY_LIMIT:-330}" \
        python3 bench/quality.py --compare attention_dropout=0 --rows-from /tmp/quality \
        --model .gpucheck/minilm \
        --shard "$shard/6" --out "/tmp/quality_$shard.json" > "/tmp/quality_$shard.log" 2>&1 &
done
wait
# One file back, not twelve: a call returns at most eight, and $OUT is emptied before the next.
python3 bench/quality.py --merge /tmp/quality_*.json --out "$OUT/quality_compare.json"
cat /tmp/quality_*.log > "$OUT/quality.log"
grep -E "Error|error" "$OUT/quality.log" | head -5
}

# The GPU test beside the quality processes: a check of labels, not a timing.
run_quality_and_test() {
run_test &
run_quality
wait
}

run_before() {
step "bench/gpu_score.py at the before commit"
PYTHONPATH=/tmp/before:/tmp/site timeout 90 python3 bench/gpu_score.py \
    --data /tmp/imdb-test-6000.csv --rows 6000 --shapes minilm --precisions bf16 \
    --skip-tutorial --out "$OUT/gpu_score_before.json" > /dev/null 2> "$OUT/gpu_score_before.err"
echo "exit $?"
grep -E "^/tmp" "$OUT/gpu_score_before.err" | cut -c1-300
}

for name in "${@:-test score finetune before}"; do
    for part in $name; do "run_$part"; done
done
step done
