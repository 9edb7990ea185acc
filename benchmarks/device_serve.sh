#!/usr/bin/env bash
# On the GPU machine: the server on a Qwen3-8B-shaped random-weight checkpoint.
#   part "tests": the CPU server tests (tests/test_server.py) against it;
#   part "bench": time from `swiftlm serve` start to a healthy /health, a concurrency sweep (1024 in / 256 out)
#   and a 1000-user reliability run; part "sweep": the same without the reliability run.
# Usage: bash benchmarks/device_serve.sh tests|bench|sweep OUT_DIR
# Wheels: the bare device has no fastapi/uvicorn/pydantic: `../shared/device/wheels.sh` fetches the server's set into
# .whl/ (add `openai jiter distro sniffio httpx2 httpcore2 truststore anyio` for the tests part: the openai client);
# carry .whl and install it first, as ../shared/device/README.md says. Without them the server cannot start: the
# script stops after SERVE_WAIT_S (default 300) seconds with the server log's tail instead of waiting forever.
set -uo pipefail
part=$1; out=$2
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
model=/tmp/qwen3-8b-demo-tok
mkdir -p "$model" "$out"
cp benchmarks/models/qwen3-8b/config.json "$model/"
# The demo tokenizer padded to the 8B vocabulary, so every id the random model samples decodes to text.
python3 -c "
from swiftlm.demo import demo_model_path
from swiftlm.testing import fill_tokenizer_vocab
fill_tokenizer_vocab(demo_model_path(), '$model', 151936)"
if [ "$part" = tests ]; then
  SWIFTLM_TEST_MODEL=$model SWIFTLM_TEST_LOAD_FORMAT=dummy python3 -m pytest -q tests/test_server.py -x 2>&1 | tail -15
  exit 0
fi
port=8011
start=$(date +%s.%N)
setsid python3 -m swiftlm serve --model "$model" --load-format dummy --port $port --host 127.0.0.1 \
  --max-waiting 4096 > "$out/server.log" 2>&1 &
if ! python3 - "$port" "${SERVE_WAIT_S:-300}" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1).status == 200:
            sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit(1)
PY
then
  echo "the server was not healthy after ${SERVE_WAIT_S:-300}s; its log ends:" >&2
  tail -20 "$out/server.log" >&2
  pkill -f "[s]wiftlm serve" || true
  exit 1
fi
ready=$(python3 -c "print(round($(date +%s.%N) - $start, 2))")
echo "server ready after ${ready}s" | tee "$out/startup.txt"
# A byte-level token may end inside a UTF-8 character and stream no text; with its logprob every token is counted.
common=(--base-url "http://127.0.0.1:$port" --model "$model" --dataset random --random-input-len 1024
        --random-output-len 256 --ignore-eos --disable-tqdm --tokenizer "$model" --extra-body '{"logprobs": 1}')
python3 -m swiftlm bench serve "${common[@]}" --max-concurrency 1,2,4,8 --num-prompts 8 --num-warmups 1 \
  --result-dir "$out/sweep_low" --label qwen3-8b-low 2>&1 | tail -6
python3 -m swiftlm bench serve "${common[@]}" --max-concurrency 16,32,64,128 --num-prompts 128 --num-warmups 1 \
  --result-dir "$out/sweep_high" --label qwen3-8b-high 2>&1 | tail -6
[ "$part" = sweep ] || python3 -m swiftlm bench reliability --base-url "http://127.0.0.1:$port" --model "$model" --users 1000 \
  --duration 120 --disable-tqdm --result-dir "$out/reliability" 2>&1 | tail -15
pkill -f "[s]wiftlm serve" || true
