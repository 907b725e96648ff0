#!/bin/sh
# gpulab TEST STAND-IN for nvidia-smi: replays output captured from a real GPU (one folder of
# tests/fixtures/nvidia-smi/, e.g. h200), so that tests on machines without a GPU can see "a GPU".
# It answers what gpulab's gpu_facts module asks (-q -x; --query-gpu=index,compute_cap --format=csv,noheader),
# plus -L and no arguments; anything else fails.
# Install: put this script and the fixture's files in one folder and link the script as /usr/local/bin/nvidia-smi
# (or set GPULAB_NVIDIA_SMI_FIXTURE to the fixture folder).
set -eu
dir="${GPULAB_NVIDIA_SMI_FIXTURE:-$(dirname "$(readlink -f "$0")")}"
case "$*" in
    "-q -x"|"-x -q") exec cat "$dir/nvidia-smi-q.xml" ;;
    # query-gpu.csv holds index first and compute_cap last (see the fixture's README.md).
    "--query-gpu=index,compute_cap --format=csv,noheader") exec awk -F', ' '{print $1 ", " $NF}' "$dir/query-gpu.csv" ;;
    "-L") exec cat "$dir/nvidia-smi-L.txt" ;;
    "") exec cat "$dir/nvidia-smi.txt" ;;
    *) echo "nvidia-smi (gpulab TEST STAND-IN): '$*' is not replayed; only -q -x, -L, the compute_cap query" >&2
       exit 2 ;;
esac
