"""Running kat on SLURM: `kat submit`, `kat jobs`, `kat logs` (docs/slurm.md).

- `spec`: `JobSpec` (allocation, environment, preemption options) and `check_fits`.
- `render`: the sbatch script (`LaunchPlan` -> text).
- `submission`: config + spec -> plan; writes the script and config snapshot, submits.
- `local`: `torchrun_command` / `launch_local`, the local multi-rank launch every `kat ... --nproc N`
  (and the multi-rank tests) goes through; `ranks`: the launcher it runs (loopback rendezvous).
- `torchrun`: the per-node launcher the script runs (torchrun + preemption notices + exit codes).
- `slurm`: sbatch/squeue/sacct/scontrol wrappers; `registry`: the submitted-jobs log;
  `status`: what `kat jobs` and `kat logs` print.
"""
