#!/usr/bin/env bash
# The default model's CPU run (what ships until a GPU run replaces it): the GPU script at CPU size.
#   scripts/default_model_cpu.sh [--out DIR]        resumable: run it again to continue
# On a shared CPU, one thread per process is much faster than two fighting for the same cores.
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$(dirname "${BASH_SOURCE[0]}")/default_model_gpu.sh" --size cpu "$@"
