#!/usr/bin/env bash
# Issue 16's GPU check in one command: the full ChatGLM-6B shape (random weights, no download), LoRA r=8 on
# query_key_value, in bf16:
#   - training tokens/s, model TFLOP/s and MFU at 512 x 4 and at 2048 x 1, plain bf16 and under autocast;
#   - peak memory of one training step at 2048 x 1 (torch.cuda.max_memory_allocated, in a fresh process);
#   - greedy decoding tokens/s, GB/s and MBU at batch 1 and 8 (generate() with the KV cache);
#   - the static-cache decoder, eager and compiled, against generate() (bench_static_decode.py);
#   - the top ops of one training step and one decode step (torch.profiler, device time).
#
#     bash bench/gpu_check.sh [OUT_DIR]                          # OUT_DIR (default bench_out): gpu_check.log + JSON
#     CONFIG=small DEVICE=cpu DTYPE=fp32 bash bench/gpu_check.sh  # a dry run of the same steps on a CPU
#
# Settings by environment: CONFIG (6b), DEVICE (cuda), DTYPE (bf16), PYTHON (python3), PEAK_TFLOPS / PEAK_GBPS (the
# device's data-sheet peaks for MFU / MBU; default: measured by bench_model.py). Every step runs even if one before it
# failed; the exit status is non-zero if any failed, and the log says which.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench_out}
CONFIG=${CONFIG:-6b} DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bf16} PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
PEAKS=()
[ -n "${PEAK_TFLOPS:-}" ] && PEAKS+=(--peak_tflops "$PEAK_TFLOPS")
[ -n "${PEAK_GBPS:-}" ] && PEAKS+=(--peak_gbps "$PEAK_GBPS")
FAILED=()

step() {  # step NAME COMMAND...: run it, its output into the log, and remember a failure
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    if "$@" 2>&1 | tee -a "$LOG"; then
        echo "== $name: done in $((SECONDS - start)) s" | tee -a "$LOG"
    else
        echo "== $name: FAILED (exit ${PIPESTATUS[0]}) after $((SECONDS - start)) s" | tee -a "$LOG"
        FAILED+=("$name")
    fi
}

model() {  # model NAME ARGS...: bench_model.py on this check's shape, device and dtype, results in NAME.json
    local name=$1
    shift
    step "$name" "$PYTHON" bench/bench_model.py --config "$CONFIG" --device "$DEVICE" --dtype "$DTYPE" \
        "${PEAKS[@]}" "$@" --json "$OUT_DIR/$name.json"
}

step environment "$PYTHON" -c "import sys, torch, transformers, peft
print('python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__,
      '| peft', peft.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f'{p.total_memory / 2**30:.0f} GiB,', p.multi_processor_count, 'SMs')"
model train_512x4 --train --seq_len 512 --batch_size 4 --steps 5 --warmup 2
model train_2048x1 --train --seq_len 2048 --batch_size 1 --steps 5 --warmup 2
model train_512x4_autocast --train --autocast --seq_len 512 --batch_size 4 --steps 5 --warmup 2
model memory_2048x1 --memory --memory_seq_len 2048
model generate --generate --gen_batch_sizes 1 8 --prompt_len 64 --new_tokens 64
step static_decode "$PYTHON" bench/bench_static_decode.py --config "$CONFIG" --device "$DEVICE" --dtype "$DTYPE" \
    --batch_sizes 1 8 --compile default --rounds 3
step profile "$PYTHON" bench/bench_model.py --config "$CONFIG" --device "$DEVICE" --dtype "$DTYPE" --profile \
    --seq_len 512 --batch_size 4 --profile_rows 15

if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_check: failed: ${FAILED[*]} (see $LOG)" | tee -a "$LOG"
    exit 1
fi
echo "gpu_check: all steps done; results in $OUT_DIR" | tee -a "$LOG"
