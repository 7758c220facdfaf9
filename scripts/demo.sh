#!/usr/bin/env bash
# Set up (if needed), then pre-train the tiny Llama demo on the bundled corpus (Python's standard
# library sources) in one process: ~3-4 minutes on a 2-core CPU. Live progress lines, validation
# loss every 50 steps, checkpoints in runs/tiny_llama_demo/checkpoints, a generated sample at the
# end. Extra arguments are config overrides, e.g.  bash scripts/demo.sh training.train_iters=20
# Two ranks instead:  DEMO_RANKS=2 bash scripts/demo.sh parallel.tp=2   (or parallel.pp=2)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bash scripts/setup.sh
export PATH="$repo/.venv/bin:$PATH" GLOG_v=${GLOG_v:-3} PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
run_dir=$(mktemp -d -t msformers_demo_XXXX)   # MindSpore writes rank_N/ folders into the cwd
# One run directory per parallel layout (a checkpoint resumes only with the layout that saved
# it): parallel.pp=2 -> runs/tiny_llama_demo_pp2. Override with logging.output_dir=...
layout=""
for a in "$@"; do [[ $a == parallel.* ]] && layout+="_${a#parallel.}"; done
out="$repo/runs/tiny_llama_demo${layout//[^A-Za-z0-9_]/}"
args=(--config "$repo/configs/tiny_llama_demo.yaml" "logging.output_dir=$out"
      "data.cache_dir=$repo/runs/data_cache" "$@")
cd "$run_dir"
if [[ "${DEMO_RANKS:-1}" == 1 ]]; then
  echo "[demo] one process; outputs in $out (checkpoint.load=auto: a rerun resumes or just evaluates)"
  timeout -k 5 900 python "$repo/training/pretrain.py" "${args[@]}" 2> >(grep -v -E "^\[WARNING\]" >&2)
else
  port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  echo "[demo] $DEMO_RANKS ranks under msrun; logs in $run_dir/logs, outputs in $out"
  # --join=True streams rank 0's output; keep the run's own lines, drop MindSpore's chatter.
  timeout -k 5 900 msrun --worker_num="$DEMO_RANKS" --local_worker_num="$DEMO_RANKS" --master_port="$port" \
     --log_dir=logs --join=True --cluster_time_out=60 "$repo/training/pretrain.py" "${args[@]}" 2>&1 \
     | grep --line-buffered -v -E "^\[(INFO|WARNING|DEBUG)\]|^$"
fi
echo "[demo] metrics: $out/metrics.jsonl   TensorBoard: tensorboard --logdir $out/tensorboard"
eval_args=$(printf ' %q' --config "$repo/configs/tiny_llama_demo.yaml" "logging.output_dir=$out" \
            "data.cache_dir=$repo/runs/data_cache" "$@")
if [[ "${DEMO_RANKS:-1}" == 1 ]]; then
  echo "[demo] evaluate: $repo/.venv/bin/python $repo/training/evaluate.py$eval_args"
else  # a checkpoint is evaluated on the layout that saved it: same ranks, same parallel.* keys
  echo "[demo] evaluate (same layout; from a scratch dir): cd \$(mktemp -d) && timeout 600" \
       "$repo/.venv/bin/msrun --worker_num=$DEMO_RANKS --local_worker_num=$DEMO_RANKS --join=True" \
       "--cluster_time_out=60 --log_dir=logs $repo/training/evaluate.py$eval_args"
fi
echo "[demo] generate: $repo/.venv/bin/python $repo/training/generate.py $out --prompt 'def '"
