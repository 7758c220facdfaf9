#!/usr/bin/env bash
# Set up (if needed) and run the main demo under msrun on 2 local CPU ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" GLOG_v=${GLOG_v:-3}
run_dir=$(mktemp -d -t msformers_demo_XXXX)   # MindSpore writes rank_N/ folders into the cwd
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo "[demo] 2 ranks, logs in $run_dir/logs"
(cd "$run_dir" && timeout -k 5 300 msrun --worker_num=2 --local_worker_num=2 --master_port="$port" \
   --log_dir=logs --join=True --cluster_time_out=60 "$OLDPWD/examples/collectives_demo.py")
grep -h "^rank" "$run_dir"/logs/worker_*.log
