#!/usr/bin/env bash
# The checks that need a GPU, in one call of a lent GPU machine (a bare image with PyTorch, no network),
# within 8 minutes on one GPU. Each figure is one JSON line, gathered in $OUT/figures.jsonl and printed
# again at the end:
#   tests       the tests that take a GPU (CUDA hard-group recall; no host sync inside a training step)
#   default     the default job on CUDA, bf16 (time/run_s and its quality)
#   vs          CLIP ViT-B/16 (224 px, bf16, batch 256) against open_clip_train's own step: same batches
#               and own pipelines, 3 interleaved rounds, samples/s and MFU, compile off
#   vs_compile  the same with our compiled step (model.compile=step) against open_clip's torch.compile
#   max_batch   ViT-L/14 with gradient checkpointing: the largest batch one GPU trains under DDP and under
#               FSDP2 (one rank: FSDP's own overhead), and samples/s at it
# Optional (not in the default list): ddp (PowerSGD hook attached over NCCL), compression (ViT-B/16,
# none against powersgd, 300 steps).
# Missing packages travel as wheels in .whl/ (see the device tool's README). DRY_RUN=1 runs every check
# on this machine's CPU at toy sizes (tests/test_gpu_checks.py does), to find mistakes before GPU time.
#   CHECKS="tests default vs vs_compile max_batch"   which checks (default: these)
set -uo pipefail
OUT=${OUT:-gpu_checks}
DRY_RUN=${DRY_RUN:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
: >"$OUT/figures.jsonl"
if ls .whl/*.whl >/dev/null 2>&1 && [[ $DRY_RUN != 1 ]]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 AUTOGLM_LOG_DIR=${AUTOGLM_LOG_DIR:-/tmp/outputs}
CHECKS=${CHECKS:-tests default vs vs_compile max_batch}
want() { [[ " $CHECKS " == *" $1 "* ]]; }
# the JSON lines a command printed, tagged with the check's name, into figures.jsonl
figures() { grep '^{' "$1" | sed "s/^{/{\"check\": \"$2\", /" >>"$OUT/figures.jsonl"; }
# a check that fails or times out is reported and the next one runs
failed() { echo "{\"check\": \"$1\", \"failed\": true, \"rc\": $2}" | tee -a "$OUT/figures.jsonl"; }

if [[ $DRY_RUN == 1 ]]; then
  DEVICE=cpu
  default_args=(trainer=cpu trainer.max_steps=4 trainer.val_check_interval=4 data.prepare.n_train=2000
    data.prepare.n_val=200 data.prepare.samples_per_shard=1000 eval.zeroshot.task=null)
  vs_args=(--device cpu --batch-size 8 --steps 2 --warmup 1 --rounds 1 --precision 32-true)
  vs_model=(--override model.text_tower.depth=1 --image-size 64)
  max_batch_args=(--device cpu --image-model vit_tiny_patch16_224 --image-size 32 --image-depth 1
    --text-width 64 --text-depth 1 --probe 4 8 --steps 1)
else
  DEVICE=cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
  default_args=(trainer=gpu trainer.precision=bf16-mixed data.num_workers=6)
  vs_args=(--device cuda --batch-size 256 --precision bf16-mixed --workers 8 --steps 20 --rounds 3
    --peak-tflops 989)
  vs_model=(--override model=vit_b16 --image-model vit_base_patch16_224 --image-size 224)
  max_batch_args=()
fi
$PY -c "import torch, timm, lightning, open_clip; print('torch', torch.__version__, 'timm', timm.__version__,
  'lightning', lightning.__version__, 'open_clip', open_clip.__version__, 'gpus', torch.cuda.device_count())" \
  | tee -a "$OUT/env.txt"

if want tests; then
  echo "== the tests that take a GPU when there is one"
  # on CPU they are skipped with their reason; -rs shows it
  timeout "${TESTS_S:-90}" $PY -m pytest -q -rs -p no:cacheprovider tests/test_shapes_groups.py \
    tests/test_compiled_step.py -k cuda 2>&1 | tee "$OUT/tests.log"
  rc=${PIPESTATUS[0]}
  passed=$(grep -oE '[0-9]+ passed' "$OUT/tests.log" | grep -oE '[0-9]+' || echo 0)
  echo "{\"check\": \"tests\", \"figure\": \"gpu_tests\", \"passed\": ${passed:-0}, \"rc\": $rc}" \
    | tee -a "$OUT/figures.jsonl"
fi

if want default; then
  echo "== the default job ($DEVICE)"
  rm -rf /tmp/outputs/default_job
  timeout "${DEFAULT_JOB_S:-120}" $PY -m autoglm_train "${default_args[@]}" logger=none progress_bar=false \
    hydra.run.dir=/tmp/outputs/default_job 2>&1 | tee "$OUT/default_job.log"
  rc=${PIPESTATUS[0]}
  if [[ $rc == 0 ]]; then
    cp /tmp/outputs/default_job/metrics.json "$OUT/default_job_metrics.json"
    $PY -c "import json; m = json.load(open('$OUT/default_job_metrics.json'))
print(json.dumps({'check': 'default', 'figure': 'default_job', 'device': '$DEVICE', **{k: m[k] for k in m
      if k in ('time/run_s', 'time/samples_per_s', 'val/r1_mean') or k.startswith(('val/hard_r1', 'zeroshot/shape'))}}))" \
      | tee -a "$OUT/figures.jsonl"
  else failed default "$rc"; fi
fi

vs() { # $1: check name, $2: compile mode, $3: seconds
  echo "== CLIP ViT-B/16 against open_clip_train, compile=$2 ($DEVICE)"
  timeout "$3" $PY bench/vs_open_clip.py "${vs_args[@]}" "${vs_model[@]}" --compile "$2" --no-write \
    "${@:4}" 2>&1 | tee "$OUT/$1.log"
  rc=${PIPESTATUS[0]}
  if [[ $rc == 0 ]]; then figures "$OUT/$1.log" "$1"; else failed "$1" "$rc"; fi
}
if want vs; then vs vs none "${VS_S:-150}" ${PROFILE:+--profile "$OUT/profile.txt"}; fi
if want vs_compile; then vs vs_compile step "${VS_COMPILE_S:-150}" --warmup 4 --rounds "${COMPILE_ROUNDS:-2}"; fi

if want max_batch; then
  echo "== ViT-L/14 with gradient checkpointing: the largest batch under DDP and FSDP ($DEVICE)"
  timeout "${MAX_BATCH_S:-180}" $PY bench/max_batch.py "${max_batch_args[@]}" 2>&1 | tee "$OUT/max_batch.log"
  rc=${PIPESTATUS[0]}
  figures "$OUT/max_batch.log" max_batch
  [[ $rc == 0 ]] || failed max_batch "$rc"
fi

if want ddp; then
  echo "== DDP over NCCL with PowerSGD: the hook is attached on CUDA"
  timeout "${DDP_S:-75}" $PY -m autoglm_train trainer=ddp trainer.devices=1 compression=powersgd \
    trainer.max_steps=30 trainer.val_check_interval=30 logger=none progress_bar=false data.num_workers=4 \
    eval.zeroshot.task=null 2>&1 | tee "$OUT/ddp_nccl.log"
  attached=$(grep -q "DDP comm hook .* attached" "$OUT/ddp_nccl.log" && echo true || echo false)
  echo "{\"check\": \"ddp\", \"figure\": \"comm_hook_attached\", \"value\": $attached}" | tee -a "$OUT/figures.jsonl"
fi

if want compression; then
  for mode in none powersgd; do
    timeout "${COMPRESSION_S:-200}" $PY -m autoglm_train trainer=ddp compression=$mode model=vit_b16 \
      data.image_size=224 data.batch_size=128 trainer.max_steps="${COMPRESSION_STEPS:-300}" \
      trainer.val_check_interval="${COMPRESSION_STEPS:-300}" trainer.log_every_n_steps=1 logger=csv \
      callbacks=none progress_bar=false data.num_workers=6 eval.zeroshot.task=null \
      hydra.run.dir=/tmp/outputs/compression_$mode 2>&1 | tee "$OUT/compression_$mode.log"
    cp /tmp/outputs/compression_$mode/metrics.json "$OUT/compression_${mode}_metrics.json"
  done
fi

echo "== figures"
cat "$OUT/figures.jsonl"
