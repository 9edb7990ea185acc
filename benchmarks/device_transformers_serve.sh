#!/usr/bin/env bash
# On the GPU machine: the peer run of the serving sweep. `transformers serve` (continuous batching, CUDA graphs) on
# a random-weight Qwen3-8B checkpoint written to disk (transformers has no dummy load format), with the same
# tokenizer and `swiftlm bench serve` settings as benchmarks/device_serve.sh (1024 in / 256 out), at fewer
# requests per level. Usage: bash benchmarks/device_transformers_serve.sh OUT_DIR (wheels as device_serve.sh).
set -uo pipefail
out=$1
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
model=/tmp/qwen3-8b-random
mkdir -p "$out"
t0=$(date +%s)
python3 -m swiftlm make-checkpoint --config benchmarks/models/qwen3-8b --output "$model" --dtype bfloat16 --device cuda \
  > "$out/make_checkpoint.log" 2>&1 || { echo "make-checkpoint failed"; tail -5 "$out/make_checkpoint.log"; exit 1; }
python3 -c "
from swiftlm.demo import demo_model_path
from swiftlm.testing import fill_tokenizer_vocab
fill_tokenizer_vocab(demo_model_path(), '$model', 151936)"
echo "checkpoint written in $(( $(date +%s) - t0 )) s"
port=8012
start=$(date +%s.%N)
setsid transformers serve --continuous-batching --cb-use-cuda-graph --dtype bfloat16 --host 127.0.0.1 \
  --port $port "$model" > "$out/transformers_serve.log" 2>&1 &
python3 - "$port" <<'PY'
import sys, time, urllib.request
deadline = time.time() + 150
while time.time() < deadline:
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1).status == 200:
            sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit("transformers serve did not become healthy in 150 s")
PY
[ $? = 0 ] || { tail -20 "$out/transformers_serve.log"; exit 1; }
echo "transformers serve ready after $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
common=(--base-url "http://127.0.0.1:$port" --model "$model" --dataset random --random-input-len 1024
        --random-output-len 256 --disable-tqdm --tokenizer "$model" --num-warmups 1 --endpoint /v1/chat/completions)
timeout 100 python3 -m swiftlm bench serve "${common[@]}" --max-concurrency 1 --num-prompts 2 \
  --result-dir "$out/c1" --label transformers-qwen3-8b-c1 2>&1 | grep -v "^wrote" | tail -4
timeout 120 python3 -m swiftlm bench serve "${common[@]}" --max-concurrency 16 --num-prompts 16 \
  --result-dir "$out/c16" --label transformers-qwen3-8b-c16 2>&1 | grep -v "^wrote" | tail -4
pkill -f "[t]ransformers serve" || true  # the bracket keeps pkill from matching a shell whose command line names it
tail -5 "$out/transformers_serve.log"
