"""Run directories runs/<dataset>/<stage>/<version>/: naming, locking, finding checkpoints, and
what this process's run has done so far (to clean up after a failed start)."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

STAGE_ORDER = ("frontend", "context", "joint", "crf")
# Where a stage takes its starting weights from, most preferred first.
PREVIOUS_STAGES = {
    "context": ("frontend",),
    "joint": ("context", "frontend"),
    "crf": ("joint", "context"),
}
# The datasets whose paper pipeline has no context stage (REFERENCE §3; the Makefile's
# STAGES_<dataset>): their joint stage trains the context module with the front-end, from it.
NO_CONTEXT_STAGE = frozenset({"camvid", "kitti"})
RUN_DIR_ENV = "DILATEDSEG_RUN_DIR"
# Beside config.yaml: the command line of the run (a requeued job finds its run by it).
COMMAND_FILE = "command.txt"
# In a job's run directory: the start of the job (see job_start) that last took it up.
JOB_START_FILE = "job_start.txt"
# How many times the job was started again: requeued by SLURM, restarted by torchrun.
RESTART_COUNTS = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")
# Held (flock) by the process that trains in a run directory, while it trains.
LOCK_FILE = ".lock"
# What a run directory holds before the run has written anything.
UNUSED_RUN_FILES = {"wandb_id.txt", LOCK_FILE}
# The run directory this process made, then the parents that making it created, innermost
# first (so a failed start can take back what it made, and only that).
_created_run_dirs: list[Path] = []
# Set once the run has worked through a batch (not a sanity check): from then on what it
# wrote (logs, W&B history) is kept even if it fails.
_run_started = False
# Set when Ctrl-C stopped the run (Lightning then exits 1 after its graceful shutdown).
_interrupted = False
# The open lock file of the run directory this process trains in (see lock_run_dir).
_run_lock = None
# Set when Lightning's SLURM requeue handler (SIGUSR1) requeued this process's job.
_requeued = False
# Lightning's log lines of that handler; the one that says `scontrol requeue` succeeded.
REQUEUE_LOGGER = "lightning.pytorch.trainer.connectors.signal_connector"
REQUEUED_MESSAGE = "Requeued SLURM job"


class RunError(Exception):
    """A run cannot start as configured; the message says what to do."""


def is_child_process() -> bool:
    """True in the processes Lightning's DDP launcher starts beside rank 0."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def is_global_rank_zero() -> bool:
    """True in the one process that writes shared files, before torch.distributed exists.

    Reads the launchers' variables: torchrun (RANK), SLURM (SLURM_PROCID, set per task when
    srun starts one process per device) and Lightning's own launcher (LOCAL_RANK, NODE_RANK).
    """
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        if os.environ.get(name, "0") != "0":
            return False
    return True


def resolve_run_dir(runs_dir: str, dataset: str, stage: str, subcommand: str,
                    ckpt_path: str | None = None, command: str = "") -> Path:
    """The directory of this run, the same one on every DDP process.

    Resuming (`fit --ckpt_path runs/.../checkpoints/last.ckpt`, or a run's hpc checkpoint)
    continues in that run's directory (:func:`checkpoint_run_dir`). Otherwise a new version_N;
    processes started by torchrun or a SLURM batch job, which cannot share a counter (or are
    requeued), use their job id (see :func:`job_run_dir`; ``command``: this run's command
    line); DDP children inherit rank 0's choice via the environment.
    """
    if is_child_process() and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    parent = Path(runs_dir) / dataset / stage
    if subcommand == "fit" and ckpt_path and (resumed := checkpoint_run_dir(ckpt_path)):
        run_dir = resumed
    elif torchrun_job():
        run_dir = job_run_dir(
            parent, f"{job_prefix(subcommand)}torchrun-{os.environ['TORCHELASTIC_RUN_ID']}",
            command)
    elif "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RunError("torchrun started these processes without a run id, so they cannot agree "
                       "on a run directory: pass --rdzv-id=<job id> (several nodes) or "
                       "--standalone (one node) to torchrun")
    elif job := slurm_batch_job():
        run_dir = job_run_dir(parent, f"{job_prefix(subcommand)}slurm-{job}", command)
    elif not is_global_rank_zero():
        # A node > 0 of a multi-node launch by hand (NODE_RANK, no torchrun or SLURM): node 0
        # names and makes the run's version_N; this process writes nothing into it.
        run_dir = parent / "version-of-node-0"
    else:
        run_dir = None
    forget_earlier_runs()  # a failure now concerns only what this run makes
    if not is_global_rank_zero():
        # Only global rank 0 makes the directories (and takes them back if the start fails):
        # one another process made, on this node or another, would outlive a failed start.
        os.environ[RUN_DIR_ENV] = str(run_dir)
        return run_dir
    made = make_directories(parent if run_dir is None else run_dir)
    if run_dir is None:  # a new version_N
        run_dir = claim_next_version(parent, "version" if subcommand == "fit" else subcommand)
        made.insert(0, run_dir)
    if made[:1] == [run_dir]:  # not a resumed run's, nor an earlier start's of this job
        _created_run_dirs.extend(made)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def checkpoint_run_dir(ckpt_path: str | Path) -> Path | None:
    """The run directory a checkpoint belongs to: ``<run>/checkpoints/<name>.ckpt``, or an
    hpc checkpoint that Lightning saved on SLURM's requeue signal, ``<run>/hpc_ckpt_<n>.ckpt``
    beside the run's config.yaml; None for a checkpoint outside a run."""
    checkpoint = Path(ckpt_path)
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    if checkpoint.match("hpc_ckpt_*.ckpt") and (checkpoint.parent / "config.yaml").is_file():
        return checkpoint.parent
    return None


def job_run_dir(parent: Path, name: str, command: str) -> Path:
    """A run's directory in a SLURM batch job or a torchrun launch: ``name``, or ``name_1``,
    ``name_2``... for the job's later runs of the same dataset and stage (a wandb agent, a loop
    in an sbatch script), the first that no run has written a config.yaml into. A restarted job
    (SLURM requeue, torchrun --max-restarts) continues the first directory whose run had the
    same command line (its ``command.txt``) and that no run of this start of the job took up
    yet (its ``job_start.txt``, see :func:`mark_job_start`): a loop that runs one command twice
    continues each of its runs. Every process of the job chooses alike: rank 0 writes
    config.yaml and job_start.txt only after all have joined the process group."""
    restarted = job_restarted()
    for number in itertools.count():
        run_dir = parent / (name if number == 0 else f"{name}_{number}")
        if not (run_dir / "config.yaml").is_file():
            return run_dir
        recorded, taken = run_dir / COMMAND_FILE, run_dir / JOB_START_FILE
        if restarted and recorded.is_file() and recorded.read_text() == command and not (
                taken.is_file() and taken.read_text() == job_start()):
            return run_dir


def job_restarted() -> bool:
    """Whether this is a requeued SLURM job or a torchrun restart (not the job's first start)."""
    return any(env_count(name) > 0 for name in RESTART_COUNTS)


def env_count(name: str) -> int:
    """A launcher's count in the environment (restarts so far, restarts allowed); 0 unset."""
    return int(os.environ.get(name) or 0)


def job_start() -> str:
    """Which start of its job this process belongs to: SLURM's and torchrun's restart counts."""
    return " ".join(f"{name}={env_count(name)}" for name in RESTART_COUNTS) + "\n"


def torchrun_job() -> bool:
    """Whether torchrun started this process with a run id (--rdzv-id, or --standalone's)."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none"


def mark_job_start(run_dir: Path) -> None:
    """In a SLURM batch job or a torchrun launch: note in ``run_dir`` that this start of the job
    took it up (see :func:`job_run_dir`). For global rank 0, once every process has chosen it
    (after they all joined the process group)."""
    if slurm_batch_job() or torchrun_job():
        (run_dir / JOB_START_FILE).write_text(job_start())


def restart_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a restarted job's fit continues ``run_dir`` from (its
    :func:`newest_restart_point`); None on a job's first start or before one exists. Lightning
    alone takes the highest hpc checkpoint, even one older than last.ckpt (an earlier requeue's),
    and without one (a job requeued after preemption or a node failure: SIGTERM, no SIGUSR1)
    trains again from the first epoch."""
    return newest_restart_point(run_dir) if job_restarted() else None


def newest_restart_point(run_dir: Path) -> Path | None:
    """The newest of Lightning's ``hpc_ckpt_<n>.ckpt`` (saved on SLURM's requeue signal) and
    ``checkpoints/last.ckpt``; None before either exists."""
    found = [*run_dir.glob("hpc_ckpt_*.ckpt"), *filter(None, [last_checkpoint(run_dir)])]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def superseded_hpc_checkpoints(run_dir: Path, resumed_from: str | None) -> list[Path]:
    """The hpc checkpoints (``hpc_ckpt_<n>.ckpt``, a whole checkpoint per requeue) that a fit
    of ``run_dir`` resumed from ``resumed_from`` goes on past: all of them when that is the
    run's newest restart point (:func:`newest_restart_point`, as a restarted job resumes),
    none otherwise (a fit resumed by hand from an older checkpoint: a newer hpc checkpoint
    holds training that fit would repeat). Read at the fit's start, so no hpc checkpoint
    saved later (a requeue during the fit) is among them, whatever the nodes' clocks say."""
    newest = newest_restart_point(run_dir)
    if not resumed_from or newest is None or Path(resumed_from).resolve() != newest.resolve():
        return []
    return sorted(run_dir.glob("hpc_ckpt_*.ckpt"))


def file_version(path: Path | None) -> tuple[int, int, int] | None:
    """What tells one save of ``path`` from the next (Lightning saves a checkpoint to a
    temporary file renamed over it: a new inode); None when there is no file."""
    if path is None or not path.is_file():
        return None
    status = path.stat()
    return status.st_ino, status.st_mtime_ns, status.st_size


def attempt_dir(run_dir: Path) -> Path:
    """Where this start of a run writes its config.yaml and CSV / TensorBoard logs: the run
    directory, or, when an earlier start already wrote there (a resumed run, a requeued SLURM
    job), a new ``resume_<k>`` inside it, so that nothing earlier is overwritten (Lightning's
    CSVLogger deletes an existing metrics.csv). Checkpoints, summary.json (its history covers
    every start) and the W&B run stay the run's. Only global rank 0 writes these files."""
    if not is_global_rank_zero() or not (run_dir / "config.yaml").is_file():
        return run_dir
    attempt = claim_next_version(run_dir, "resume")
    _created_run_dirs[:] = [attempt]  # a start that fails takes back this, never the run
    return attempt


def forget_earlier_runs() -> None:
    """A new command in this process (tests, the report and sweeps run several): a failed
    start takes back only what this command makes, never an earlier run's directories, and
    the earlier command's run is no longer locked."""
    global _run_started, _interrupted, _requeued
    _run_started = _interrupted = _requeued = False
    _created_run_dirs.clear()
    release_run_lock()


def run_started() -> bool:
    """Whether this command's run has worked through a batch (see mark_run_started)."""
    return _run_started


def run_interrupted() -> bool:
    """Whether Ctrl-C stopped this command's run."""
    return _interrupted


def mark_run_started() -> None:
    """This command's run has worked through a batch: what it wrote is kept if it fails."""
    global _run_started
    _run_started = True


def mark_interrupted(interrupted: bool) -> None:
    """Whether Ctrl-C stopped this command's run (the run's exception says)."""
    global _interrupted
    _interrupted = interrupted


def resume_advice(subcommand: str, stopped_by_signal: bool = False) -> str:
    """For a fit that stopped before its end: how to go on (its newest restart point, see
    :func:`newest_restart_point`, or start again). Stopped by a signal in a job that its
    launcher may start again (see :func:`restarters`), that start resumes by itself: the
    advice says so, and from which checkpoint."""
    if subcommand != "fit":
        return ""
    newest = newest_restart_point(Path(os.environ.get(RUN_DIR_ENV, ".")))
    by_hand = f"resume it with --ckpt_path={newest}" if newest else \
        "it saved no checkpoint yet: start it again"
    if not stopped_by_signal:
        return by_hand
    itself = f"it resumes from {newest} by itself" if newest else "it starts again by itself"
    if _requeued:
        return f"SLURM requeued the job: {itself}"
    if launchers := restarters():
        return f"if {' or '.join(launchers)}, {itself}; otherwise {by_hand}"
    return by_hand


def restarters() -> list[str]:
    """What may start this process's run again after a signal stopped it, as far as the process
    can know: SLURM, when it is a task of a batch job (SLURM requeues one that was preempted,
    if the job and cluster allow requeueing, which the job cannot see), and torchrun, while
    restarts are left (``--max-restarts``; not when torchrun itself was stopped)."""
    found = []
    if slurm_batch_job():
        found.append("SLURM requeues the job")
    left = env_count("TORCHELASTIC_MAX_RESTARTS") - env_count("TORCHELASTIC_RESTART_COUNT")
    if torchrun_job() and left > 0:
        found.append(f"torchrun restarts it ({left} restart{'s' if left > 1 else ''} left)")
    return found


class _RequeueWatch(logging.Filter):
    """Notes Lightning's log line that its SLURM requeue handler's `scontrol requeue` succeeded
    (global rank 0 runs it): the job starts again and resumes by itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        global _requeued
        if record.getMessage().startswith(REQUEUED_MESSAGE):
            _requeued = True
        return True


def watch_requeue() -> None:
    """Watch for Lightning's requeue of this SLURM job (see :class:`_RequeueWatch`)."""
    logger = logging.getLogger(REQUEUE_LOGGER)
    if not any(isinstance(watch, _RequeueWatch) for watch in logger.filters):
        logger.addFilter(_RequeueWatch())


def lock_run_dir(run_dir: Path) -> None:
    """Lock ``run_dir`` while this process trains in it, so that a second fit into the same
    run (resuming a run that is still training, say with --ckpt_path=last) stops before it
    starts instead of writing its checkpoints and summary over the first's. The kernel
    releases the lock when the process ends, however it ends (a crash, kill -9, a requeued
    job), so no stale lock is left behind. Rank 0 only; a filesystem without locks skips it."""
    global _run_lock
    try:
        import fcntl
    except ImportError:  # not POSIX
        return
    release_run_lock()
    handle = open(run_dir / LOCK_FILE, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunError(
            f"the run {run_dir} is still training in another process (it holds "
            f"{run_dir / LOCK_FILE}): wait for it to finish, or stop it, before resuming it; "
            "to train meanwhile, start a new run (without --ckpt_path)") from None
    except OSError:  # no locks on this filesystem
        handle.close()
        return
    _run_lock = handle


def run_in_progress(run_dir: Path) -> bool:
    """Whether a process trains in ``run_dir`` now (holds its lock, see lock_run_dir)."""
    try:
        import fcntl
    except ImportError:
        return False
    if not (run_dir / LOCK_FILE).is_file():
        return False
    with open(run_dir / LOCK_FILE) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # no locks on this filesystem
            return False
    return False


def release_run_lock() -> None:
    global _run_lock
    if _run_lock is not None:
        _run_lock.close()  # closing the file releases its lock
        _run_lock = None


def make_directories(path: Path) -> list[Path]:
    """mkdir -p ``path``; the directories this call made, innermost first (one another process
    made meanwhile is not counted)."""
    made = []
    for directory in (*reversed(path.parents), path):
        try:
            directory.mkdir()
            made.append(directory)
        except OSError as error:  # exists (or EACCES / EISDIR first, as os.makedirs knows)
            if directory.exists() and not directory.is_dir():
                raise RunError(f"{directory} is a file, not a folder for runs: move it, or "
                               "pass another --runs_dir") from None
            if not directory.is_dir():
                raise RunError(f"cannot make the run folder {directory}: {error.strerror}"
                               ) from None
    return made[::-1]


def claim_next_version(parent: Path, prefix: str) -> Path:
    """Make ``<parent>/<prefix>_N`` for the next free N; the mkdir that succeeds claims it, so
    two runs started at the same moment never share a directory."""
    taken = [int(p.name.rsplit("_", 1)[1]) for p in parent.glob(f"{prefix}_*")
             if p.name.rsplit("_", 1)[1].isdigit()]
    number = max(taken, default=-1) + 1
    while True:
        run_dir = parent / f"{prefix}_{number}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            number += 1


def job_prefix(subcommand: str) -> str:
    """A job's training run is ``slurm-<id>`` / ``torchrun-<id>``; its validate / test /
    predict runs get their own (``validate-slurm-<id>``), not the training run's directory."""
    return "" if subcommand == "fit" else f"{subcommand}-"


def slurm_batch_job() -> str | None:
    """The job id when this process runs as a task of a SLURM batch job, one task or many (a
    requeued job finds its run directory again); None in an interactive allocation (job name
    bash / interactive), as Lightning's own SLURM detection decides."""
    if "SLURM_NTASKS" not in os.environ:
        return None
    if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    return os.environ.get("SLURM_JOB_ID") or None


def discard_unused_run_dirs() -> list[Path]:
    """Remove the directories this process made for a run that stopped before it worked
    through a single batch and saved no checkpoint (missing or malformed data, a bad option or
    checkpoint): failed starts leave no version_N (or runs/<dataset>/<stage>), W&B run or
    config.yaml behind. Directories made earlier, and any run that got going, are kept."""
    removed: list[Path] = []
    if not is_global_rank_zero():  # the other processes of a job leave it to rank 0
        return removed
    finish_wandb()  # its files are closed before they go
    if not _created_run_dirs:
        return removed
    run_dir, *parents = _created_run_dirs
    _created_run_dirs.clear()
    files = [p for p in run_dir.rglob("*") if p.is_file()] if run_dir.is_dir() else []
    unused = all(p.name in UNUSED_RUN_FILES for p in files) or (
        not _run_started and not any(p.suffix == ".ckpt" for p in files))
    if not unused:
        return removed
    shutil.rmtree(run_dir, ignore_errors=True)
    removed.append(run_dir)
    for parent in parents:  # innermost first; one another run has started using stays
        try:
            parent.rmdir()
            removed.append(parent)
        except OSError:
            break
    return removed


def finish_wandb() -> None:
    """End this process's W&B run, if one was started (offline: files closed, nothing sent)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1)


def best_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def last_checkpoint(run_dir: Path) -> Path | None:
    path = run_dir / "checkpoints" / "last.ckpt"
    return path if path.is_file() else None


def latest_checkpoint(runs_dir: str, dataset: str, stage: str,
                      pick: Callable[[Path], Path | None]) -> Path | None:
    """The checkpoint that ``pick`` finds in a run directory (best_checkpoint, say) of the
    latest run of a stage that has one: the newest such file (a directory's own time also
    changes when a resume fails to start)."""
    found = [path for path in map(pick, (Path(runs_dir) / dataset / stage).glob("*/")) if path]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def resolve_checkpoint_alias(ckpt_path: str, runs_dir: str, dataset: str, stage: str) -> str:
    """``--ckpt_path=best`` / ``last``: the best checkpoint, or the newest restart point (its
    last.ckpt, or a newer hpc checkpoint: see :func:`newest_restart_point`), of the latest run
    of this dataset and stage (Lightning's own aliases only work inside one process); a path
    stays as it is."""
    if ckpt_path not in ("best", "last"):
        return ckpt_path
    found = latest_checkpoint(runs_dir, dataset, stage,
                              best_checkpoint if ckpt_path == "best" else newest_restart_point)
    if found is None:
        raise RunError(f"--ckpt_path={ckpt_path}: no run under {runs_dir}/{dataset}/{stage}/ has "
                       f"a {ckpt_path} checkpoint; train the stage first, or pass the path")
    return str(found)


def find_previous_checkpoint(runs_dir: str, dataset: str, stage: str) -> Path:
    """Best checkpoint of the latest run of the stage this one starts from; when no run of it
    saved a best one (runs that never validated), the latest last.ckpt."""
    previous = PREVIOUS_STAGES.get(stage)
    if not previous:
        raise RunError(f"stage '{stage}' has no previous stage; set --model.init_from=null")
    for candidate in previous:
        for pick in (best_checkpoint, last_checkpoint):
            checkpoint = latest_checkpoint(runs_dir, dataset, candidate, pick)
            if checkpoint is not None and run_in_progress(checkpoint.parent.parent):
                raise RunError(
                    f"init_from: auto found {checkpoint}, but its '{candidate}' run is still "
                    "training: wait for it to finish, or name the weights yourself with "
                    "--model.init_from=PATH (make train ... INIT=PATH)")
            if checkpoint is not None:
                return checkpoint
    where = ", ".join(f"{runs_dir}/{dataset}/{s}/" for s in previous)
    first = next(s for s in previous if not (s == "context" and dataset in NO_CONTEXT_STAGE))
    train = f"make train STAGE={first} DATASET={dataset}"
    if Path(runs_dir) != Path("runs"):  # make train alone writes under runs/, not found here
        train += (f' ARGS="..." with the --config / --runs_dir options that put this run '
                  f"under {runs_dir}/")
    raise RunError(
        f"stage '{stage}' starts from a trained '{first}' stage, but no checkpoint was "
        f"found under {where}.\nTrain it first: {train}"
        f"\nor name the weights yourself: --model.init_from=PATH (make train ... INIT=PATH)")
