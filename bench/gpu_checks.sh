#!/usr/bin/env bash
# The checks that need a GPU, in one call of a lent GPU machine (a bare image with PyTorch, no network):
# the tests that take a GPU, the default job on CUDA in bf16, DDP over NCCL with a compression hook, and
# CLIP ViT-B/16 against open_clip (with profiler tables of both). Missing packages travel as wheels in
# .whl/ (see the device tool's README). Logs and metrics go to $OUT (default: gpu_checks/).
#   CHECKS="tests default ddp vs compression"  which checks (default: all)
#   VS_ARGS="..."                  more arguments for bench/vs_open_clip.py
set -uo pipefail
OUT=${OUT:-gpu_checks}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 AUTOGLM_LOG_DIR=/tmp/outputs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, timm, lightning, open_clip; print('torch', torch.__version__, 'timm', timm.__version__,
  'lightning', lightning.__version__, 'open_clip', open_clip.__version__, 'gpus', torch.cuda.device_count())" \
  | tee -a "$OUT/env.txt"
CHECKS=${CHECKS:-tests default ddp vs compression}
want() { [[ " $CHECKS " == *" $1 "* ]]; }

if want tests; then
  echo "== the tests that take a GPU when there is one"
  python3 -m pytest -q -p no:cacheprovider tests/test_shapes_groups.py -k cuda 2>&1 | tee "$OUT/tests.log"
fi

if want default; then
  echo "== the default job on one GPU, bf16-mixed"
  timeout "${DEFAULT_JOB_S:-150}" python3 -m autoglm_train trainer=gpu trainer.precision=bf16-mixed \
    logger=none progress_bar=false data.num_workers=6 hydra.run.dir=/tmp/outputs/default_job 2>&1 \
    | tee "$OUT/default_job.log"
  cp /tmp/outputs/default_job/metrics.json "$OUT/default_job_metrics.json"
fi

if want ddp; then
  echo "== DDP over NCCL with PowerSGD: the hook is attached on CUDA"
  timeout "${DDP_S:-75}" python3 -m autoglm_train trainer=ddp trainer.devices=1 compression=powersgd \
    trainer.max_steps=30 trainer.val_check_interval=30 logger=none progress_bar=false data.num_workers=4 \
    eval.zeroshot.task=null 2>&1 | tee "$OUT/ddp_nccl.log"
  if grep -q "DDP comm hook .* attached" "$OUT/ddp_nccl.log"; then echo "comm hook: attached"; else
    echo "comm hook: NOT attached"; fi
fi

if want vs; then
  echo "== CLIP ViT-B/16 (224 px, bf16, batch 256) against open_clip"
  read -ra vs_args <<<"${VS_ARGS:-}"
  timeout "${VS_OPEN_CLIP_S:-180}" python3 bench/vs_open_clip.py --device cuda --override model=vit_b16 \
    --image-model vit_base_patch16_224 --image-size 224 --batch-size 256 --precision bf16-mixed \
    --workers 8 --steps 20 --rounds "${ROUNDS:-3}" --peak-tflops 989 --no-write --profile "$OUT/profile.txt" \
    "${vs_args[@]}" 2>&1 | tee "$OUT/vs_open_clip.log"
fi

if want compression; then
  # issue 16's GPU point: ViT-B/16 scale over NCCL in bf16, on every GPU of the machine, bytes per step
  # and step time without and with the compression=powersgd default (one GPU: the hook still compresses)
  echo "== ViT-B/16 over NCCL, bf16: compression=none against compression=powersgd"
  for mode in none powersgd; do
    timeout "${COMPRESSION_S:-200}" python3 -m autoglm_train trainer=ddp compression=$mode model=vit_b16 \
      data.image_size=224 data.batch_size=128 trainer.max_steps="${COMPRESSION_STEPS:-300}" \
      trainer.val_check_interval="${COMPRESSION_STEPS:-300}" trainer.log_every_n_steps=1 logger=csv \
      callbacks=none progress_bar=false data.num_workers=6 eval.zeroshot.task=null \
      hydra.run.dir=/tmp/outputs/compression_$mode 2>&1 | tee "$OUT/compression_$mode.log"
    cp /tmp/outputs/compression_$mode/metrics.json "$OUT/compression_${mode}_metrics.json"
    cp /tmp/outputs/compression_$mode/csv/metrics.csv "$OUT/compression_${mode}.csv"
  done
fi
