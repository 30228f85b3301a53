# GPUs per job, and which device each job gets (included by train.smk; used by the train, evaluate and
# benchmark rules).
# - Every GPU rule asks resources `gpu=<n>`: a training job the launcher's process count
#   (launcher_processes, common.smk), evaluation and benchmark jobs 1. Locally `./run.sh` passes
#   `--resources gpu=<visible GPUs>`, so at most that many GPUs are in use at once; under the SLURM
#   profile the executor turns `gpu` into `--gpus=<n>` of the job's sbatch call.
# - Snakemake does not say which device a job gets: GPU_SLOT (scripts/gpu_slot.py) takes that many
#   free device slots (flock) and sets CUDA_VISIBLE_DEVICES before the job's command starts.
# - LOCAL_GPUS is the `--resources gpu=N` Snakemake was started with (0 when not given); the training
#   and evaluation jobs then take cores/N threads each, so N of them run side by side. Without GPUs each
#   takes `launcher.cpu_threads` threads (null: every core, one job at a time; 1: one job per core side by
#   side, which the study uses; README "The study" has the measurement).
import shlex

_gpu_resource = workflow.global_resources.get("gpu")
LOCAL_GPUS = int(_gpu_resource.value) if _gpu_resource is not None and _gpu_resource.value else 0
_cpu_threads = (config.get("launcher") or {}).get("cpu_threads")
GPU_JOB_THREADS = (max(1, workflow.cores // LOCAL_GPUS) if LOCAL_GPUS
                   else min(workflow.cores, _cpu_threads) if _cpu_threads else workflow.cores)


#: Shell prefix of a GPU job: `{GPU_SLOT} {resources.gpu} -- <command>` runs the command on that many
#: devices of its own (in the shell line, not in params, so that it never triggers a rerun).
GPU_SLOT = f"{shlex.quote(PYTHON)} scripts/gpu_slot.py --gpus"


if LOCAL_GPUS:
    for _run_id, _run in RUNS.items():
        if launcher_processes(_run["method"]) > LOCAL_GPUS:
            raise WorkflowError(
                f"config error: launcher.num_processes={launcher_processes(_run['method'])} (run {_run_id}) "
                f"needs more GPUs than the {LOCAL_GPUS} given by --resources gpu={LOCAL_GPUS}")
