#!/usr/bin/env bash
# Run a command with a CUDA MPS (Multi-Process Service) control daemon of its own, then stop the daemon.
#
# Why: several worker processes on ONE GPU normally time-slice it (one context at a time), so a split over
# workers on one card measures the slicing, not the pipeline. Under MPS they share one context and their
# kernels run side by side, as on separate cards for batch-1 decode (one stage computes at a time). It is how
# this project measures 2- and 4-stage splits when only one GPU is lent (bench/gpu_notes.md, twenty-ninth
# session); LocalCluster sees the daemon (runtime/local_cluster.py: mps_active) and arms shared-GPU workers.
# It starts a user-space daemon only: no GPU setting (compute mode, clocks, MIG) is touched.
#
#   bench/with_mps.sh python3 bench/gpu_pipeline.py --parts 1gpu,split2,split4 ...
set -u
if ! command -v nvidia-cuda-mps-control >/dev/null; then
    echo "with_mps.sh: nvidia-cuda-mps-control is not on PATH (it ships with the NVIDIA driver's utilities)" >&2
    exit 2
fi
dir=$(mktemp -d "${TMPDIR:-/tmp}/hyperlane-mps.XXXXXX")
export CUDA_MPS_PIPE_DIRECTORY="$dir/pipe" CUDA_MPS_LOG_DIRECTORY="$dir/log"
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
if ! nvidia-cuda-mps-control -d; then
    echo "with_mps.sh: the MPS control daemon did not start (see $CUDA_MPS_LOG_DIRECTORY)" >&2
    exit 2
fi
stop() {
    echo quit | nvidia-cuda-mps-control
    sleep 1
    rm -rf "$dir"
}
trap stop EXIT
"$@"
