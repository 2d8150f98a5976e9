"""The corpus stage on a datatrove executor: its steps (`utils/data/corpus_steps.py`) run here
(LocalPipelineExecutor), on a Slurm cluster (SlurmPipelineExecutor) or on a Ray cluster (RayPipelineExecutor).

    python prepare_data.py --executor local --tasks 4 --workers 2                 # this machine
    python prepare_data.py --executor slurm --slurm_partition cpu --tasks 256 --workers 64   # sbatch array jobs
    ray start --head --port 6379                                                 # then, on every other node:
    ray start --address HEAD:6379                                                # ... and on the head node:
    RAY_ADDRESS=HEAD:6379 python prepare_data.py --executor ray --tasks 256

`--executor builtin` (the default) is the single-machine path of `utils/data/corpus.py`, fastest on one machine.
Every path the steps touch (inputs, output, `--work_dir`, `--logging_dir`, this repository and its Python
environment) must be the same on every node: a shared filesystem. The intermediate files live in `--work_dir`
(about 1.5x the output while the stage runs; removed at the end), datatrove's logs, statistics and completion
markers per step in `--logging_dir`. Run the same command again after a failure: steps and tasks that finished
are skipped (datatrove's completions), as long as the settings and `--tasks` did not change.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from utils.config import REPO_ROOT, run_config
from utils.data.corpus import CleaningArguments, DedupArguments, InputArguments, OutputArguments, corpus_settings
from utils.data.corpus_steps import (
    INTERMEDIATE,
    BandBuckets,
    CleanAndSign,
    CorpusStep,
    Finish,
    GatherShards,
    KeepFirst,
    WritePieces,
    band_config,
)
from utils.data.sources import discover_inputs
from utils.errors import UserError
from utils.io import check_output_dir

logger = logging.getLogger(__name__)

EXECUTORS = ("builtin", "local", "slurm", "ray")
_RUN_RECORD = "run.yaml"  # the settings the work directory's files were made with


@dataclass
class ExecutorArguments:
    executor: str = field(default="builtin", metadata={"choices": EXECUTORS, "help": (
        "Where the corpus stage runs. 'builtin': this machine, the toolkit's own worker processes (--num_proc; the "
        "fastest on one machine). 'local', 'slurm', 'ray': as a datatrove pipeline on LocalPipelineExecutor "
        "(this machine), SlurmPipelineExecutor (sbatch array jobs) or RayPipelineExecutor (a Ray cluster); same "
        "documents and shards as 'builtin' (docs/CORPUS_AT_SCALE.md).")})
    tasks: int = field(default=max(1, os.cpu_count() or 1), metadata={
        "help": "datatrove tasks per parallel step: each cleans about 1/tasks of the input (every tasks-th file, "
                "or of each file every tasks-th record when there are fewer files than tasks)."})
    workers: int = field(default=-1, metadata={
        "help": "Tasks running at once (local: processes; slurm: the array's %%limit; ray: tasks in flight); "
                "-1 = all."})
    work_dir: str = field(default="", metadata={
        "help": "Folder for the intermediate files (on a filesystem every node sees); '' = OUTPUT_DIR.datatrove "
                "beside --output_dir."})
    logging_dir: str = field(default="", metadata={
        "help": "datatrove's logging folder (per-step logs, stats, completion markers); '' = WORK_DIR/logs."})
    slurm_partition: str = field(default="", metadata={"help": "Slurm partition to submit to (sbatch --partition)."})
    slurm_time: str = field(default="24:00:00", metadata={"help": "Time limit of each Slurm task (sbatch --time)."})
    slurm_cpus_per_task: int = field(default=1, metadata={"help": "CPUs per Slurm task (sbatch --cpus-per-task)."})
    slurm_mem_per_cpu_gb: int = field(default=2, metadata={
        "help": "Memory per CPU of a Slurm task, GB (sbatch --mem-per-cpu)."})
    slurm_qos: str = field(default="", metadata={"help": "Slurm QOS (sbatch --qos); '' = the cluster's default."})
    slurm_env_command: str = field(default="", metadata={
        "help": "Shell command that sets up Python in each Slurm job; '' = activate this Python's virtualenv and put "
                "this repository on PYTHONPATH."})
    ray_address: str = field(default="", metadata={
        "help": "Ray cluster to connect to (ray.init's address: HOST:PORT, 'auto', ray://HOST:10001); '' = "
                "$RAY_ADDRESS, else a Ray instance started here for the run."})
    ray_cpus_per_task: int = field(default=1, metadata={"help": "CPUs Ray reserves per task."})
    ray_mem_per_cpu_gb: float = field(default=2.0, metadata={"help": "Memory Ray reserves per CPU of a task, GB."})

    def __post_init__(self):
        if self.tasks < 1 or self.workers == 0 or self.workers < -1:
            raise ValueError(f"--tasks must be >= 1 and --workers >= 1 or -1 (all), not {self.tasks} / {self.workers}")
        if self.executor == "slurm" and not self.slurm_partition:
            raise ValueError("--executor slurm needs --slurm_partition: the Slurm partition to submit the jobs to "
                             "(sinfo lists them)")
        if min(self.slurm_cpus_per_task, self.slurm_mem_per_cpu_gb, self.ray_cpus_per_task) < 1 \
                or self.ray_mem_per_cpu_gb <= 0:
            raise ValueError("--slurm_cpus_per_task, --slurm_mem_per_cpu_gb, --ray_cpus_per_task and "
                             "--ray_mem_per_cpu_gb must be positive")


@dataclass(frozen=True)
class Step:
    name: str
    step: CorpusStep | BandBuckets
    tasks: int


def corpus_steps(args: ExecutorArguments, files: list[Path], inputs: InputArguments, cleaning: CleaningArguments,
                 dedup: DedupArguments, outputs: OutputArguments, work: Path, destination: Path) -> list[Step]:
    """The steps of the stage, in order, each with its number of tasks (`files` as the user named them; the
    tasks get them as absolute paths)."""
    settings = corpus_settings(cleaning, dedup, outputs.seed)
    bands = band_config(dedup, outputs.seed) if dedup.dedup else None
    steps = [Step("clean_and_sign", CleanAndSign(str(work), [str(file.absolute()) for file in files], inputs,
                                                 settings, bands), args.tasks)]
    if bands is not None:  # at most a task per band: datatrove's split of a band needs many documents per file
        steps.append(Step("buckets", BandBuckets(str(work), bands), min(args.tasks, bands.num_buckets)))
    steps += [Step("keep_first", KeepFirst(str(work), inputs, dedup, outputs, args.tasks), 1),
              Step("write_pieces", WritePieces(str(work)), args.tasks),
              Step("gather_shards", GatherShards(str(work)), args.tasks),
              Step("finish", Finish(str(work), [str(file) for file in files], (inputs, cleaning, dedup, outputs),
                                    str(destination)), 1)]
    return steps


def run_corpus_stage(args: ExecutorArguments, inputs: InputArguments, cleaning: CleaningArguments,
                     dedup: DedupArguments, outputs: OutputArguments) -> dict | None:
    """Run (local, ray) or submit (slurm) the stage; the report (stats.json) when it ran here, None when submitted."""
    if inputs.max_docs != -1:
        raise UserError("--max_docs is for quick trials of the builtin path", field="max_docs",
                        fix="leave --max_docs at -1 with a datatrove executor, or use --executor builtin")
    destination = Path(outputs.output_dir).absolute()
    check_output_dir(destination, outputs.overwrite_output_dir)
    files = discover_inputs(inputs.input)
    work = Path(args.work_dir or f"{destination}.datatrove").absolute()
    logs = Path(args.logging_dir).absolute() if args.logging_dir else work / "logs"
    steps = corpus_steps(args, files, inputs, cleaning, dedup, outputs, work, destination)
    _claim_work_dir(work, logs, steps, {**run_config(inputs, cleaning, dedup, outputs), "tasks": args.tasks})
    logger.info("corpus stage on datatrove's %s executor: %s; work dir %s, logs %s", args.executor,
                ", ".join(f"{step.name} ({step.tasks} task{'s' * (step.tasks > 1)})" for step in steps), work, logs)
    if args.executor == "slurm":
        _submit_to_slurm(args, steps, logs)
        return None
    started_ray = args.executor == "ray" and _connect_to_ray(args)
    try:
        for step in steps:
            executor = _executor(args, step, logs)
            executor.run()
            missing = executor.get_incomplete_ranks(skip_completed=True)
            if missing:
                raise _failed(step, missing, work, logs)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return json.loads((destination / "stats.json").read_text(encoding="utf-8"))


def _claim_work_dir(work: Path, logs: Path, steps: list[Step], record: dict) -> None:
    """Resume the work directory's run when it was made with these settings; otherwise (other settings, or a
    finished run, whose record Finish removed) clear what an earlier run left there and start over."""
    saved = work / _RUN_RECORD
    if saved.is_file() and yaml.safe_load(saved.read_text(encoding="utf-8")) == record:
        logger.info("resuming the run in %s (finished tasks are skipped)", work)
    else:
        for folder in [*(work / name for name in INTERMEDIATE), *(logs / step.name for step in steps), work / "errors"]:
            shutil.rmtree(folder, ignore_errors=True)
    (work / "errors").mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(record, allow_unicode=True), encoding="utf-8")


def _executor(args: ExecutorArguments, step: Step, logs: Path):
    workers = min(step.tasks, args.workers) if args.workers > 0 else step.tasks
    logging_dir = str(logs / step.name)
    if args.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        # fork, as the builtin path's pool: forkserver's workers import this command again (transformers
        # included), seconds per worker and step
        return LocalPipelineExecutor([step.step], tasks=step.tasks, workers=workers, logging_dir=logging_dir,
                                     start_method="fork")
    from datatrove.executor import RayPipelineExecutor

    return RayPipelineExecutor([step.step], tasks=step.tasks, workers=workers, logging_dir=logging_dir,
                               cpus_per_task=args.ray_cpus_per_task, mem_per_cpu_gb=args.ray_mem_per_cpu_gb)


def _connect_to_ray(args: ExecutorArguments) -> bool:
    """Connect to the Ray cluster (or start a Ray instance here); True when this call did, so it shuts it down.
    Ray's workers import this repository's steps: they get it on PYTHONPATH (the same path on every node)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=args.ray_address or None, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    logger.info("Ray: %s CPUs in the cluster", ray.cluster_resources().get("CPU", 0))
    return True


def _submit_to_slurm(args: ExecutorArguments, steps: list[Step], logs: Path) -> None:
    """Submit every step as a Slurm array job, each depending on the one before (sbatch returns at once)."""
    from datatrove.executor import SlurmPipelineExecutor

    env_command = args.slurm_env_command or (
        f"source {Path(sys.prefix) / 'bin' / 'activate'}; export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}")
    previous = None
    for step in steps:
        previous = SlurmPipelineExecutor(
            [step.step], tasks=step.tasks, time=args.slurm_time, partition=args.slurm_partition,
            cpus_per_task=args.slurm_cpus_per_task, mem_per_cpu_gb=args.slurm_mem_per_cpu_gb,
            workers=min(step.tasks, args.workers) if args.workers > 0 else -1, job_name=f"prepare_data_{step.name}",
            qos=args.slurm_qos, env_command=env_command, logging_dir=str(logs / step.name), depends=previous)
    previous.run()
    logger.info("submitted the corpus stage to Slurm partition %s: %d array jobs, each after the one before "
                "(the last one writes the output; squeue -u $USER follows them; logs in %s)", args.slurm_partition,
                len(steps), logs)


def _failed(step: Step, missing: list[int], work: Path, logs: Path) -> UserError:
    """The error a task recorded (bad input found while reading), else which tasks did not finish."""
    for path in sorted((work / "errors").glob("*.json")):
        return UserError(**json.loads(path.read_text(encoding="utf-8")))
    return UserError(f"{len(missing)} of {step.tasks} tasks of the '{step.name}' step did not finish (tasks "
                     f"{', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''})",
                     path=str(logs / step.name), fix="see the task logs in that folder (logs/); run the same "
                                                     "command again to rerun the unfinished tasks")
