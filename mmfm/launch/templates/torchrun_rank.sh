#!/usr/bin/env bash
# One training rank under torchrun: `torchrun ... --no-python bash torchrun_rank.sh LOG_DIR COMMAND...` runs
# COMMAND with its output appended to LOG_DIR/rank_<RANK>.log (a requeued job continues the same file).
# Rank 0's output also goes to the console: the terminal, or the Slurm job's output file.
log_dir=$1
shift
mkdir -p "$log_dir"
log="$log_dir/rank_$RANK.log"
if [ "$RANK" = 0 ]; then
  exec "$@" > >(tee -a "$log") 2>&1
fi
exec "$@" >>"$log" 2>&1
