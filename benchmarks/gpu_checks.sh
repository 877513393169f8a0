#!/usr/bin/env bash
# The checks the issues ask of a machine with an NVIDIA GPU, as one script (the device tool's H200: torch, triton,
# transformers, peft and sentence-transformers installed, nothing to fetch, at most 64 MiB of the tree sent).
#
# Prepared here, before the call:
#   python benchmarks/device_kit.py export .devkit         # the base's and embedder's configs and tokenizers
#   pip download ... -d .whl faiss-cpu                     # what the machine lacks (see the device tool's README)
#   git rm -r -q --cached zoo/library; echo /zoo/library/ >> .git/info/exclude   # 85 MB that must not travel
#   (afterwards: git reset -q -- zoo/library, and drop that line from .git/info/exclude)
# There:   OUT=/some/folder bash benchmarks/gpu_checks.sh [steps]   (steps: pytest bench live_add cache; default all)
# Each step has a time limit, and writes its log to $OUT/<step>.log. Measured on the H200 on 2026-12-04: start and
# setup ~1.5 min, pytest 25 s, bench > 330 s (it was cut there after the first 1,000-expert row: each batch size of
# each scenario takes 10-15 s of launch-bound generation, and making 1,000 random experts ~60 s), live_add > 120 s
# (the from_library of three PHATGOOSE experts trains their gates first), cache 32 s. With 15 minutes of device time
# in all, run `pytest bench` in one call and `live_add cache` in the next, at once (the machine stays warm 30 s).
set -u
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRITON_INTERPRET=0
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
# adapters/ and routers/ install as moerge.adapters and moerge.routers (pyproject's package-dir): link them to run
# from the tree without installing
for pkg in adapters routers; do [ -e "moerge/$pkg" ] || ln -s "../$pkg" "moerge/$pkg"; done
export PYTHONPATH=/tmp/site:$PWD
eval "$(python3 benchmarks/device_kit.py random .devkit /tmp/moerge-models)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, 'cpus', __import__('os').cpu_count())"

step() {  # step NAME SECONDS COMMAND...: run it within the limit, log to $OUT/NAME.log, show its end
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "=== $name: exit $? at $(date +%T)"
  grep -v -e "it/s]" -e "Warning" "$OUT/$name.log" | tail -n "${TAIL:-45}"
}
ALL=${*:-pytest bench live_add cache}
for STEPS in $ALL; do
  case $STEPS in
    pytest) step pytest 120 python3 -m pytest -q -m gpu -p no:cacheprovider $(grep -rl "mark.gpu" tests) ;;
    bench) step bench 400 python3 -m moerge.lab.bench --device cuda --dtype bfloat16 --expert-dtype bfloat16 \
             --batch 1,8,32 --experts 16,1000 --skip-xlora --repeat 2 --out "$OUT" ;;
    live_add) step live_add 300 python3 benchmarks/live_add.py --default-base --train-steps 30 --reference-s 10 \
             --calls 10 ;;
    cache) step cache 100 python3 benchmarks/cache.py --experts 40 --requests 6 --device cuda \
             --device-cache-mib 64 --cache-mib 256 --library /tmp/moerge-cache-bench ;;
    cache_cpu) step cache_cpu 200 python3 benchmarks/cache.py --experts 200 --requests 10 \
             --library /tmp/moerge-cache-bench ;;
    *) echo "unknown step $STEPS" ;;
  esac
done
