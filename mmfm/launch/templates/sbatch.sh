#!/bin/bash
#SBATCH --job-name={{ job_name }}
#SBATCH --nodes={{ nodes }}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={{ gpus_per_node }}
#SBATCH --cpus-per-task={{ cpus_per_task }}
#SBATCH --mem={{ mem }}
#SBATCH --partition={{ partition }}
#SBATCH --account={{ account }}
#SBATCH --qos={{ qos }}
#SBATCH --time={{ time }}
#SBATCH --signal=B:USR1@{{ signal_lead_s }}
#SBATCH {{ requeue_flag }}
#SBATCH --open-mode=append
#SBATCH --output={{ run_dir }}/logs/slurm-%j.out
#SBATCH --chdir={{ workdir }}
{{ sbatch_flags }}

# Rendered by `mmfm launch` from mmfm/launch/templates/sbatch.sh: one torchrun per node starts that node's
# ranks, which meet at a rendezvous on the first node. Rank logs: <run dir>/logs/rank_<RANK>.log; this
# script's: slurm-<job>.out.
{{ setup }}
{{ env }}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS={{ omp_threads }}

run_dir={{ run_dir_q }}
requeue={{ requeue }}
request="$run_dir/{{ preempt_request }}" saved="$run_dir/{{ preempt_saved }}"
rm -f "$request" "$saved"  # left by an allocation that ended early
# Slurm's pre-timeout signal (--signal=B:USR1 above): every rank checkpoints at its next step and exits.
trap 'echo "mmfm launch: pre-timeout signal, asking the ranks to checkpoint"; touch "$request"' USR1

head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
echo "mmfm launch: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES node(s), rendezvous $head:{{ master_port }}"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  {{ srun_flags }} \
  {{ python }} -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc-per-node={{ procs_per_node }} \
  --rdzv-backend=c10d --rdzv-endpoint="$head:{{ master_port }}" --rdzv-id="$SLURM_JOB_ID" \
  --no-python bash {{ rank_wrapper }} "$run_dir/logs" \
  {{ python }} -m mmfm.cli.main train \
  {{ overrides }} &
srun_pid=$!
# srun runs in the background so that the trap runs at once; the trap interrupts `wait`, so wait again.
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done
wait "$srun_pid"
status=$?
rm -f "$request"

if [ -f "$saved" ]; then  # the ranks checkpointed on request: continue in a new allocation
  rm -f "$saved"
  if $requeue; then
    echo "mmfm launch: checkpoint saved, requeueing job $SLURM_JOB_ID; it resumes in $run_dir"
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "mmfm launch: checkpoint saved; resume with: sbatch $run_dir/sbatch.sh"
  fi
fi
exit $status
