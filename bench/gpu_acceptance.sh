#!/usr/bin/env bash
# Every GPU claim of twa_scale in one run, on one GPU, in <= 8 minutes.
#
#   bash bench/gpu_acceptance.sh OUT_DIR              # on the GPU host
#   bash bench/gpu_acceptance.sh --dry-run OUT_DIR    # CPU, tiny sizes, same code paths (CI runs this)
#   bash bench/gpu_acceptance.sh --science OUT_DIR    # the science run alone (its own <= 8 minutes): the
#       equal-compute frontier on full CIFAR-10, ResNet-20, E=40, K=5, with a live follower (OUT_DIR/science/)
#   bash bench/gpu_acceptance.sh --science --dry-run OUT_DIR    # its plan on CPU at tiny sizes (CI runs this)
#
# Writes OUT_DIR/gpu_acceptance.json and OUT_DIR/gpu_acceptance.log; see bench/gpu_acceptance.py
# for the sections and their goals, and docs/benchmarks.md ("GPU acceptance") for carrying the wheels
# and the dataset to a host without a package index.
#
# First it installs the carried wheels, .whl/*.whl (built here by ../shared/offline/gpu-wheelhouse.sh:
# deepspeed and its few dependencies the GPU image lacks), into a private target directory put on
# PYTHONPATH. Nothing is installed in a --dry-run.
#
#   bash bench/gpu_acceptance.sh --prepare           # here (pip works): build .whl/ and .data/ to carry
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
py=${PYTHON:-python3}

# Runtime dependencies (pyproject.toml) that the GPU image lacks beyond deepspeed's: carried as wheels
# at the versions installed here.
EXTRA_WHEELS=(simplejpeg typing_extensions obstore)  # obstore: the S3 data path (twa_scale/store/s3client.py)  # typing_extensions: pydantic 2.14 needs Sentinel (>= 4.14)
if [[ ${1:-} == --prepare ]]; then
  set -e
  bash "$repo/../shared/offline/gpu-wheelhouse.sh" .whl
  pins=()
  for name in "${EXTRA_WHEELS[@]}"; do
    pins+=("$name==$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
  done
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pins[@]}"
  mkdir -p .data && cp "$repo/../shared/datasets/cifar10.tar.gz" .data/
  du -sh .whl .data
  echo "carry .whl and .data (git-ignored) with the checkout; then: bash bench/gpu_acceptance.sh OUT_DIR"
  exit 0
fi
dry=0
for arg in "$@"; do [[ $arg == --dry-run ]] && dry=1; done

wheels="none: no .whl/*.whl next to the repo root"
shopt -s nullglob
whls=(.whl/*.whl)
if (( dry )); then
  wheels="not installed (--dry-run)"
elif (( ${#whls[@]} )); then
  site=${TWA_ACCEPTANCE_SITE:-/tmp/twa_scale_site}
  t0=$SECONDS
  if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "${whls[@]}" >/tmp/twa_scale_wheels.log 2>&1; then
    wheels="installed ${#whls[@]} wheels into $site in $((SECONDS - t0))s: $(cd .whl && ls *.whl | tr '\n' ' ')"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    wheels="FAILED to install .whl/*.whl: $(tail -c 600 /tmp/twa_scale_wheels.log | tr '\n' ' ')"
  fi
fi
echo "wheels: $wheels"
export TWA_ACCEPTANCE_WHEELS="$wheels"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" bench/gpu_acceptance.py "$@"
