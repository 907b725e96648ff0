#!/usr/bin/env bash
# Build (or reuse) gpulab-test/dl-notebook:latest, the deep-learning-like test image (see dl-image/Dockerfile).
# Wheels come from PyPI through the host's pip (containers here cannot verify TLS to PyPI); nothing is pulled from a
# container registry. About 2 minutes and 1.8 GB, once.
set -euo pipefail
# shellcheck source=tests/harness/lib.sh
. "$(dirname "$0")/lib.sh"
ensure_docker_engine
if docker image inspect "$GPULAB_DL_IMAGE" >/dev/null 2>&1 && [ "${1:-}" != --rebuild ]; then
    log "deep-learning-like image $GPULAB_DL_IMAGE is cached"
    exit 0
fi
bash "$(dirname "$0")/build-base-image.sh" 12
context="${GPULAB_CACHE}/dl-image"
mkdir -p "$context/wheels"
cp "$(dirname "$0")/dl-image/Dockerfile" "$context/Dockerfile"
log "downloading the CPU build of PyTorch and NumPy wheels for Python 3.11 (cached in $context/wheels)"
python3 -m pip download -q --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$context/wheels" 'torch==2.13.0' numpy
log "building $GPULAB_DL_IMAGE"
docker build -q --label "$GPULAB_LABEL" --label io.gpulab.image=dl-notebook \
    --build-arg "BASE=${GPULAB_BASE_IMAGE_PREFIX}:12" -t "$GPULAB_DL_IMAGE" "$context" >/dev/null
log "built $GPULAB_DL_IMAGE ($(docker image inspect -f '{{.Size}}' "$GPULAB_DL_IMAGE" | awk '{printf "%.2f GB", $1/1e9}'))"
