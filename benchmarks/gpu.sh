#!/usr/bin/env bash
# LightningDiT XL/1 training throughput on one CUDA GPU without network (issue #19):
#
#   bash benchmarks/gpu.sh [WHEELS_DIR] [bench_gpu.py options...]
#
# installs what benchmarks/bench_gpu.py needs from the wheels in WHEELS_DIR (default ./wheels), then
# runs it: micro batch 32 and 64, activation checkpointing off/on, compile off/on, our DeepSpeed engine
# next to a plain PyTorch loop, with MFU against the bf16 matmul peak it measures first. The whole script
# (install included) ends within GPU_BENCH_TOTAL_S seconds (default 470, under 8 minutes): the benchmark
# gets what the install left, as its `--budget-s`, and a `timeout` around it. With $OUT set the output is
# also written to $OUT/gpu_bench.txt. Options after WHEELS_DIR go to bench_gpu.py (see its --help).
#
# The Python environment, first that applies:
# - $GPU_BENCH_VENV, created if missing;
# - this repository's .venv if its torch is a CUDA build that sees a GPU;
# - ${TMPDIR:-/tmp}/ldit-gpu-venv, created with the system site packages when `python3` already has a
#   CUDA torch (then no torch wheel is needed: without one in WHEELS_DIR that torch is kept, whatever
#   its version), else bare.
# Into it: pyproject.toml's dependencies, `pip install --no-index --find-links WHEELS_DIR`. If not all
# of them are there, only what the benchmark imports (torch, deepspeed, omegaconf) is installed.
#
# Preparing WHEELS_DIR on a machine with network, for the GPU machine's Python (3.12 here; PYV below)
# and x86-64 Linux. Versions are pyproject.toml's (torch 2.14.1, torchvision 0.29.1, deepspeed 0.19.8):
#
#   W=wheels PYV=3.12; mkdir -p $W
#   PLAT="--only-binary=:all: --python-version $PYV --implementation cp --platform manylinux_2_28_x86_64
#         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   # 1. torch and torchvision, a CUDA build with its nvidia-* libraries (PyPI's Linux x86-64 wheels are
#   #    CUDA builds; for another CUDA add --index-url https://download.pytorch.org/whl/cu130
#   #    --extra-index-url https://pypi.org/simple):
#   pip download -d $W $PLAT torch==2.14.1 torchvision==0.29.1
#   # 2. DeepSpeed is published as source only: build its pure-Python wheel (no ops compiled) with a pip
#   #    whose environment has torch installed (DeepSpeed's setup.py imports it):
#   pip wheel --no-build-isolation --no-deps -w $W deepspeed==0.19.8
#   # 3. The other dependencies of pyproject.toml, and DeepSpeed's own (read from its wheel); -f $W
#   #    keeps the torch of step 1:
#   pip download -d $W -f $W $PLAT $W/deepspeed-0.19.8-*.whl $(python3 -c 'import tomllib;
#     print(*(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
#             if not d.startswith(("torch>", "torchvision>", "deepspeed>"))))')
#
# About 4 GB with torch's CUDA libraries. Copy WHEELS_DIR next to the repository on the GPU machine.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
WHEELS=${1:-$ROOT/wheels}
[[ $# -gt 0 ]] && shift
TOTAL_S=${GPU_BENCH_TOTAL_S:-470}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# Whether interpreter $1 has a CUDA build of torch that sees a GPU.
cuda_torch() {
  "$1" -c 'import sys, torch; sys.exit(not (torch.version.cuda and torch.cuda.is_available()))' 2>/dev/null
}

if [[ -n ${GPU_BENCH_VENV:-} ]]; then
  VENV=$GPU_BENCH_VENV
elif [[ -x .venv/bin/python ]] && cuda_torch .venv/bin/python; then
  VENV=.venv
else
  VENV=${TMPDIR:-/tmp}/ldit-gpu-venv
fi
if [[ ! -x $VENV/bin/python ]]; then
  SYSPY=${PYTHON:-python3}
  if cuda_torch "$SYSPY"; then
    "$SYSPY" -m venv --system-site-packages "$VENV"
  else
    "$SYSPY" -m venv "$VENV"
  fi
fi
PY=$VENV/bin/python
[[ -d $WHEELS ]] || echo "gpu.sh: no wheel folder $WHEELS; only what is installed already can be used" >&2

# pyproject.toml's dependencies, one a line; torch and torchvision left out when the environment has a
# CUDA torch and WHEELS_DIR has no torch wheel to replace it. $1: "all", or "bench" for the three the
# benchmark imports.
requirements() {
  local keep_torch=0
  if cuda_torch "$PY" && ! compgen -G "$WHEELS/torch-[0-9]*.whl" >/dev/null; then keep_torch=1; fi
  "$PY" - "$1" "$keep_torch" <<'EOF'
import re, sys, tomllib
which, keep_torch = sys.argv[1], sys.argv[2] == "1"
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name = re.split(r"[<>=!~;\[\s]", dep, maxsplit=1)[0].lower()
    if keep_torch and name in ("torch", "torchvision"):
        continue
    if which == "all" or name in ("torch", "deepspeed", "omegaconf"):
        print(dep)
EOF
}

pip_install() {
  # --no-build-isolation: were an sdist of DeepSpeed given instead of its wheel, its build needs our torch.
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-build-isolation --no-compile "$@"
}

mapfile -t ALL < <(requirements all)
if ! pip_install "${ALL[@]}"; then
  echo "gpu.sh: not every dependency of pyproject.toml is in $WHEELS; installing the benchmark's own" >&2
  mapfile -t BENCH < <(requirements bench)
  pip_install "${BENCH[@]}"
fi
"$PY" -c 'import torch, importlib.metadata as m; ds = m.version("deepspeed")
print(f"gpu.sh: torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {ds}")'
echo "gpu.sh: $PY ready after $SECONDS s"

if [[ " $* " != *" --device cpu "* ]] && ! cuda_torch "$PY"; then
  echo "gpu.sh: the torch of $PY sees no CUDA GPU (nvidia-smi, and a CUDA build of torch?)" >&2
  exit 1
fi
LEFT=$((TOTAL_S - SECONDS))
if ((LEFT < 60)); then
  echo "gpu.sh: only $LEFT s of GPU_BENCH_TOTAL_S=$TOTAL_S left after the install" >&2
  exit 1
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# The benchmark stops starting runs at its budget; `timeout` (SIGTERM, SIGKILL 10 s later) is the backstop.
CMD=(timeout -k 10 "$LEFT" "$PY" benchmarks/bench_gpu.py --budget-s "$((LEFT - 20))" "$@")
if [[ -n ${OUT:-} ]]; then
  mkdir -p "$OUT"
  "${CMD[@]}" 2>&1 | tee "$OUT/gpu_bench.txt"
else
  "${CMD[@]}"
fi
