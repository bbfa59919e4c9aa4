# Sourced by the run scripts in this folder (after they set LOG): `say` prints a timestamped line,
# `run` prints a command and runs it; both append to $LOG.
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
run() { say "\$ $*"; "$@" 2>&1 | tee -a "$LOG"; }
