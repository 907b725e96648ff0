#!/bin/sh
# gpulab TEST STAND-IN for nvidia-smi: replays output captured from a real GPU (one folder of
# tests/fixtures/nvidia-smi/, e.g. h200), so that tests on machines without a GPU can see "a GPU".
# It answers what gpulab's gpu_facts module asks (-q -x; --query-gpu=index,compute_cap --format=csv,noheader; with
# processes: true the usage query below and --query-compute-apps=pid,used_memory,gpu_uuid), plus -L and no
# arguments; anything else fails.
# Compute processes: a test chooses them by writing lines "PID, USED_MIB, GPU_UUID" to the processes file
# (GPULAB_NVIDIA_SMI_PROCESSES, default /run/gpulab-nvidia-smi/processes.csv), e.g. the PID of a real process it
# started in a student's container. As the real nvidia-smi does, only live PIDs are listed, and their memory is
# added to memory.used of their GPU.
# Install: put this script and the fixture's files in one folder and link the script as /usr/local/bin/nvidia-smi
# (or set GPULAB_NVIDIA_SMI_FIXTURE to the fixture folder).
set -eu
dir="${GPULAB_NVIDIA_SMI_FIXTURE:-$(dirname "$(readlink -f "$0")")}"
processes="${GPULAB_NVIDIA_SMI_PROCESSES:-/run/gpulab-nvidia-smi/processes.csv}"
usage_query="--query-gpu=index,uuid,name,driver_version,memory.total,memory.used,utilization.gpu,pci.bus_id,compute_cap"

# The live lines of the processes file, as nvidia-smi prints them ("pid, used_memory, gpu_uuid").
live_processes() {
    [ -r "$processes" ] || return 0
    while IFS=', ' read -r pid used uuid; do
        case "$pid" in ''|*[!0-9]*) continue ;; esac
        if [ -d "/proc/$pid" ]; then printf '%s, %s, %s\n' "$pid" "$used" "$uuid"; fi
    done <"$processes"
}

case "$*" in
    "-q -x"|"-x -q") exec cat "$dir/nvidia-smi-q.xml" ;;
    # query-gpu.csv holds index first and compute_cap last (see the fixture's README.md).
    "--query-gpu=index,compute_cap --format=csv,noheader") exec awk -F', ' '{print $1 ", " $NF}' "$dir/query-gpu.csv" ;;
    # query-gpu.csv is this query's real answer (its columns, nounits); the live processes' memory is added.
    "$usage_query --format=csv,noheader,nounits")
        live_processes | awk -F', ' -v OFS=', ' '
            NR == FNR { used[$3] += $2; next }
            { $6 += used[$2]; print }' - "$dir/query-gpu.csv" ;;
    "--query-compute-apps=pid,used_memory,gpu_uuid --format=csv,noheader,nounits") live_processes ;;
    "-L") exec cat "$dir/nvidia-smi-L.txt" ;;
    "") exec cat "$dir/nvidia-smi.txt" ;;
    *) echo "nvidia-smi (gpulab TEST STAND-IN): '$*' is not replayed; only -q -x, -L, the compute_cap, usage and" \
            "compute-apps queries" >&2
       exit 2 ;;
esac
