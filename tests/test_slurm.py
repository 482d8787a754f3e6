"""A SLURM batch job of two nodes simulated on one machine (CPU, gloo): each task started as
`srun --nodes=2 --ntasks-per-node=1` starts it (SLURM's variables, no srun), then requeued
for real: SIGUSR1 as `#SBATCH --signal=SIGUSR1@120` sends it to every task, Lightning saves
its hpc checkpoint and runs `scontrol requeue` (a fake one on PATH, which records the call and
ends the tasks as SLURM's requeue does), and the requeued job continues the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from conftest import shapes_args
from test_ddp import free_port, fresh_env

JOB_ID = "4242"
TASKS = 2
STAGE_DIR = Path("shapes/frontend")


def slurm_env(rank: int, port: int, restarts: int, bin_dir: Path) -> dict[str, str]:
    """What srun gives task ``rank`` of a 2-node job, one task per node ("localhost" stands
    for the first node), plus a free MASTER_PORT and ``bin_dir`` (the fake scontrol) on PATH."""
    env = {name: value for name, value in fresh_env().items() if not name.startswith("SLURM_")}
    env.update(
        SLURM_JOB_ID=JOB_ID, SLURM_JOB_NAME="dilatedseg", SLURM_NODELIST="localhost",
        SLURM_NNODES=str(TASKS), SLURM_JOB_NUM_NODES=str(TASKS), SLURM_NTASKS=str(TASKS),
        SLURM_NTASKS_PER_NODE="1", SLURM_PROCID=str(rank), SLURM_NODEID=str(rank),
        SLURM_LOCALID="0", SLURM_RESTART_COUNT=str(restarts), MASTER_PORT=str(port),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return env


def start_job(tmp: Path, data: Path, restarts: int, *extra: str) -> list[subprocess.Popen]:
    """The job's tasks: `dilatedseg fit` as examples/slurm.sbatch runs it (devices per node,
    num_nodes, ddp), on the CPU; their pids go to tmp/tasks for the fake scontrol."""
    args = shapes_args(data, tmp / "runs", *extra, "--trainer.accelerator=cpu",
                       "--trainer.devices=1", f"--trainer.num_nodes={TASKS}",
                       "--trainer.strategy=ddp")
    port = free_port()
    tasks = [subprocess.Popen([sys.executable, "-m", "dilatedseg.cli", "fit", *args], cwd=tmp,
                              env=slurm_env(rank, port, restarts, tmp / "bin"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(TASKS)]
    (tmp / "tasks").write_text(" ".join(str(task.pid) for task in tasks))
    return tasks


def finish(tasks: list[subprocess.Popen], codes: set[int]) -> list[str]:
    """The tasks' output once they ended, each with an exit status in ``codes``."""
    outputs = []
    for task in tasks:
        try:
            outputs.append(task.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            task.kill()
            outputs.append(task.communicate()[0] + "\n(killed after 300 s)")
    for task in tasks:
        assert task.returncode in codes, "\n----\n".join(out[-3000:] for out in outputs)
    return outputs


def fake_scontrol(tmp: Path) -> Path:
    """scontrol on PATH: records its arguments in tmp/scontrol.log, then, as `scontrol
    requeue` does, ends the job's tasks with SIGTERM. The log's path."""
    log = tmp / "scontrol.log"
    script = tmp / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\nkill -TERM $(cat {tmp / "tasks"})\n')
    script.chmod(0o755)
    return log


def test_a_two_node_slurm_job_trains_in_one_run_dir(tiny_shapes, tmp_path):
    """Both tasks join one DDP run of 2 processes; rank 0 writes slurm-<job id>."""
    fake_scontrol(tmp_path)
    outputs = finish(start_job(tmp_path, tiny_shapes, 0, "--trainer.max_epochs=1"), {0})
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outputs[0]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    assert "SLURM auto-requeueing enabled" in outputs[0]  # Lightning's SLURMEnvironment
    stage_dir = tmp_path / "runs" / STAGE_DIR
    assert [p.name for p in stage_dir.iterdir()] == [f"slurm-{JOB_ID}"]
    run_dir = stage_dir / f"slurm-{JOB_ID}"
    assert {"config.yaml", "command.txt", "summary.json", "checkpoints"} <= {
        p.name for p in run_dir.iterdir()}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["num_nodes"] == TASKS and saved["trainer"]["strategy"] == "ddp"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["history"][0]["step"] == 2  # 32 images / (batch 8 x 2 processes)
    assert Path(summary["best_checkpoint"]).is_file()
    assert (run_dir / "checkpoints/last.ckpt").is_file()
    assert not (tmp_path / "scontrol.log").exists()  # no signal, no requeue


EPOCHS = 20


def test_a_requeued_slurm_job_continues_its_run(tiny_shapes, tmp_path):
    """SIGUSR1 to every task after the first epoch: Lightning saves hpc_ckpt_1.ckpt in the
    run directory (its default_root_dir), rank 0 alone requeues the job; the requeued job
    (same id, SLURM_RESTART_COUNT=1, same command) finds the run and that checkpoint and
    trains the epochs after it, in the same directory, to the end."""
    log = fake_scontrol(tmp_path)
    epochs = f"--trainer.max_epochs={EPOCHS}"
    tasks = start_job(tmp_path, tiny_shapes, 0, epochs)
    run_dir = tmp_path / "runs" / STAGE_DIR / f"slurm-{JOB_ID}"
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints/last.ckpt").is_file() and time.monotonic() < deadline:
        if any(task.poll() is not None for task in tasks):
            finish(tasks, {"(running until the signal)"})
        time.sleep(0.1)
    for task in tasks:
        task.send_signal(signal.SIGUSR1)
    outputs = finish(tasks, {128 + signal.SIGTERM})
    assert log.read_text() == f"requeue {JOB_ID}\n", outputs[0][-3000:]  # rank 0, once
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert 1 <= hpc["epoch"] < EPOCHS - 1 and hpc["global_step"] >= 2

    outputs = finish(start_job(tmp_path, tiny_shapes, 1, epochs), {0})
    assert f"Restoring states from the checkpoint path at {run_dir / 'hpc_ckpt_1.ckpt'}" in (
        outputs[0])
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(row["epoch"], row["step"]) for row in summary["history"]] == [
        (epoch, 2 * (epoch + 1)) for epoch in range(EPOCHS)]  # the first start's rows kept
    # The requeued start (its own config and CSV log in resume_0) trained only what was left.
    rows = (run_dir / "resume_0/metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    first_epoch = min(int(row.split(",")[header.index("epoch")]) for row in rows[1:])
    assert first_epoch == hpc["epoch"]
    assert (run_dir / "resume_0/command.txt").read_text() == (
        run_dir / "command.txt").read_text()
