#!/usr/bin/env bash
# The GPU checks in one run: the CUDA tests, then the benches, each beside transformers in the same run;
# one report, $OUT/gpu_report.md (./gpu_report.md when OUT is unset), and each bench's JSON line in
# $OUT/gpu_results.jsonl. Installs nothing from a network. When the GPU machine's transformers is not the
# 4.57 our tests compare against, carry wheels made here by `bash bench/gpu_wheels.sh` (folder .whl) and
# this script puts them first on PYTHONPATH. Each step has its own time limit; a failed step is reported
# and the next one runs. All steps together may take about 10 minutes on one H200, more than one device
# command may run, so a lease runs them in two calls (each report then covers its own steps):
#
#   STEPS="tests kernels decode" bash bench/gpu.sh       # first call
#   STEPS="throughput ttft tp quant" bash bench/gpu.sh   # second call
#   bash bench/gpu.sh                                    # everything, where no limit applies
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
REPORT=$OUT/gpu_report.md
RESULTS=$OUT/gpu_results.jsonl
STEPS=${STEPS:-"tests kernels decode throughput ttft tp quant"}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qvl-site \
    .whl/*.whl && export PYTHONPATH=$PWD:/tmp/qvl-site
fi
: >"$REPORT"; : >"$RESULTS"

step() {   # step NAME SECONDS COMMAND...: run it, log its output in the report, keep its JSON lines
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local log; log=$(mktemp)
  local t0=$SECONDS
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  { echo "## $name (exit $rc, $((SECONDS - t0)) s)"; echo '```'; echo "\$ $*"; tail -n 60 "$log"; echo '```'; } >>"$REPORT"
  grep '^{' "$log" >>"$RESULTS" || true
  echo "$name: exit $rc in $((SECONDS - t0)) s"
}

{ echo "# qvl GPU report, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"; echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1
  echo '```'; } >>"$REPORT"

step tests 300 bash -c 'python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_attention_paged.py &&
                         python3 -m pytest -q -p no:cacheprovider tests/test_model_parity.py -k cuda'
step kernels 60 python3 bench/attention_paged.py
step decode 150 bash -c 'python3 bench/decode.py --config 2b --device cuda --new-tokens 256 --repeats 2 &&
                          python3 bench/decode.py --config 2b --device cuda --new-tokens 256 --repeats 2 --enforce-eager'
step throughput 180 python3 bench/throughput.py --config 2b --device cuda --concurrency 32 128 --new-tokens 128
step ttft 60 python3 bench/ttft.py --config 2b --device cuda --width 1280 --height 720
step tp 120 bash -c 'python3 -m pytest -q -p no:cacheprovider tests/test_tp_cuda.py;
                    python3 bench/tp.py --device cuda --dtype bfloat16 || python3 bench/tp.py --device cuda --dtype bfloat16 --backend gloo'
step quant 180 python3 bench/quant.py --device cuda --variants bf16,int8,int4,awq --repeats 2 --new-tokens 32
echo "report: $REPORT"
