"""DDP on CPU (gloo, 2 processes): one shared run directory, rank-0-only files, and a validation
mIoU identical to a single process on the same checkpoint and data, also when the processes
get different numbers of images; the same for two torchrun nodes simulated on one machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO, run_cli, shapes_args
from fixtures_datasets import logged_metrics

from dilatedseg.runs import mark_job_start, resolve_run_dir

DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]


def fresh_env(**variables: str) -> dict[str, str]:
    """The environment of a command started afresh: W&B offline, none of the launcher
    variables this process may hold, plus ``variables``."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", **variables}
    for name in ("DILATEDSEG_RUN_DIR", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK",
                 "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run_ddp(*argv: str, cwd: Path) -> str:
    """`dilatedseg ...` in a fresh process: Lightning starts rank 1 by re-running this command."""
    done = subprocess.run([sys.executable, "-m", "dilatedseg.cli", *argv], cwd=cwd,
                          env=fresh_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


VAL_IMAGES = 5  # odd: 3 + 2 per rank, in batches of 2: 2 batches on rank 0, 1 on rank 1


@pytest.fixture(scope="module")
def odd_shapes(tiny_shapes, tmp_path_factory) -> Path:
    """tiny_shapes with 5 val images, which 2 processes cannot share evenly."""
    root = tmp_path_factory.mktemp("odd") / "shapes"
    shutil.copytree(tiny_shapes, root)
    names = (root / "val.txt").read_text().split()
    (root / "val.txt").write_text("\n".join(names[:VAL_IMAGES]) + "\n")
    return root


def odd_args(root: Path, runs: Path, *extra: str) -> list[str]:
    return [*shapes_args(root, runs, *extra), "--data.init_args.val_batch_size=2"]


@pytest.fixture(scope="module")
def ddp_fit(odd_shapes, tmp_path_factory):
    """One epoch of 2-process DDP training (32 train / 5 val images: ranks validate 3 and 2
    images in different numbers of batches)."""
    runs = tmp_path_factory.mktemp("ddp") / "runs"
    run_ddp("fit", *odd_args(odd_shapes, runs, "--trainer.max_epochs=1", *DDP),
            cwd=runs.parent)
    return runs


def test_ddp_fit_uses_one_run_dir_written_by_rank_zero(ddp_fit):
    stage_dir = ddp_fit / "shapes" / "frontend"
    assert [p.name for p in stage_dir.iterdir()] == ["version_0"]  # both ranks agreed
    run_dir = stage_dir / "version_0"
    assert {"config.yaml", "summary.json", "metrics.csv", "checkpoints"} <= {
        p.name for p in run_dir.iterdir()}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"] == str(run_dir) and summary["history"]
    assert Path(summary["best_checkpoint"]).is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert str(saved["trainer"]["devices"]) == "2" and saved["trainer"]["strategy"] == "ddp"


def test_ddp_validate_equals_single_process(ddp_fit, odd_shapes, monkeypatch):
    """Also when the images do not divide among the processes: none is scored twice."""
    checkpoint = ddp_fit / "shapes" / "frontend" / "version_0" / "checkpoints" / "last.ckpt"
    args = odd_args(odd_shapes, ddp_fit, f"--ckpt_path={checkpoint}")
    run_ddp("validate", *args, *DDP, cwd=ddp_fit.parent)
    monkeypatch.chdir(ddp_fit.parent)
    run_cli("validate", *args, "--trainer.accelerator=cpu", "--trainer.devices=1")
    ddp = logged_metrics(ddp_fit / "shapes" / "frontend" / "validate_0")
    single = logged_metrics(ddp_fit / "shapes" / "frontend" / "validate_1")
    assert sorted(p.name for p in (ddp_fit / "shapes" / "frontend").iterdir()) == [
        "validate_0", "validate_1", "version_0"]
    iou_keys = [k for k in single if k.startswith("val/IoU/") or k == "val/mIoU"]
    assert "val/mIoU" in iou_keys and "val/IoU/background" in iou_keys
    for key in iou_keys + ["val/loss"]:  # summed confusion matrix: exact, not a rank's share
        assert ddp[key] == pytest.approx(single[key], abs=1e-4), key


def test_children_inherit_rank_zeros_run_dir(tmp_path, monkeypatch):
    runs = str(tmp_path / "runs")
    first = resolve_run_dir(runs, "shapes", "frontend", "fit")
    monkeypatch.setenv("LOCAL_RANK", "1")  # what Lightning's launcher sets in rank 1
    assert resolve_run_dir(runs, "shapes", "frontend", "fit") == first
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("DILATEDSEG_RUN_DIR")
    assert resolve_run_dir(runs, "shapes", "frontend", "fit").name == "version_1"


@pytest.mark.parametrize("env, name", [
    ({"TORCHELASTIC_RUN_ID": "abc", "LOCAL_RANK": "1", "RANK": "3"}, "torchrun-abc"),
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, "slurm-77"),
    # one task: a requeued job must find its run again
    ({"SLURM_JOB_ID": "78", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train"}, "slurm-78"),
    # an interactive allocation runs one command after another: each its own version_N
    ({"SLURM_JOB_ID": "79", "SLURM_NTASKS": "4", "SLURM_JOB_NAME": "bash"}, "version_0"),
])
def test_launcher_job_ids_name_the_run_dir(tmp_path, monkeypatch, env, name):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run_dir = resolve_run_dir(str(tmp_path), "shapes", "frontend", "fit")
    assert run_dir == tmp_path / "shapes" / "frontend" / name
    # The job's evaluation after its training gets a directory of its own.
    monkeypatch.delenv("DILATEDSEG_RUN_DIR")
    evaluation = resolve_run_dir(str(tmp_path), "shapes", "frontend", "validate")
    assert evaluation.name == (f"validate-{name}" if "version" not in name else "validate_0")


@pytest.mark.parametrize("job", [{"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1"},
                                 {"TORCHELASTIC_RUN_ID": "abc"}])
def test_a_jobs_later_runs_get_their_own_directories(tmp_path, monkeypatch, job):
    """Two fits of one stage in one job (a wandb agent, a loop in an sbatch script) do not
    share a directory; a restarted job continues the run of its command line."""
    for key, value in job.items():
        monkeypatch.setenv(key, value)
    restart = "SLURM_RESTART_COUNT" if "SLURM_JOB_ID" in job else "TORCHELASTIC_RESTART_COUNT"

    def resolve(command):
        monkeypatch.delenv("DILATEDSEG_RUN_DIR", raising=False)
        return resolve_run_dir(str(tmp_path), "shapes", "frontend", "fit", command=command)

    first = resolve("fit --model.lr=0.1")
    assert resolve("fit --model.lr=0.2") == first  # nothing written yet: still free
    (first / "config.yaml").write_text("lr: 0.1")
    (first / "command.txt").write_text("fit --model.lr=0.1")
    second = resolve("fit --model.lr=0.2")
    assert second == first.with_name(first.name + "_1")
    (second / "config.yaml").write_text("lr: 0.2")
    (second / "command.txt").write_text("fit --model.lr=0.2")
    assert resolve("fit --model.lr=0.1").name == first.name + "_2"  # a third run, not restarted
    monkeypatch.setenv(restart, "1")
    assert resolve("fit --model.lr=0.2") == second  # requeued: each command finds its run
    assert resolve("fit --model.lr=0.1") == first


@pytest.mark.parametrize("job", [{"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1"},
                                 {"TORCHELASTIC_RUN_ID": "abc"}])
def test_a_restarted_job_continues_each_of_its_runs_of_one_command(tmp_path, monkeypatch, job):
    """A loop in an sbatch script that runs one command twice, requeued during the second run:
    both runs of the requeued job used to continue the first one's directory, the second run's
    half-trained one left behind."""
    for key, value in job.items():
        monkeypatch.setenv(key, value)
    restart = "SLURM_RESTART_COUNT" if "SLURM_JOB_ID" in job else "TORCHELASTIC_RESTART_COUNT"
    command = "fit --config conf/shapes.yaml"

    def start_run():
        """resolve_run_dir, then what rank 0 writes once the processes have joined."""
        monkeypatch.delenv("DILATEDSEG_RUN_DIR", raising=False)
        run_dir = resolve_run_dir(str(tmp_path), "shapes", "frontend", "fit", command=command)
        if not (run_dir / "config.yaml").is_file():
            (run_dir / "config.yaml").write_text("{}")
            (run_dir / "command.txt").write_text(command)
        mark_job_start(run_dir)  # (JobRestarts.setup)
        return run_dir

    first, second = start_run(), start_run()
    assert second == first.with_name(first.name + "_1")
    monkeypatch.setenv(restart, "1")  # the job starts again: the script from its top
    assert [start_run(), start_run()] == [first, second]
    assert (second / "job_start.txt").read_text() == (first / "job_start.txt").read_text()
    monkeypatch.setenv(restart, "2")  # requeued again, during the first run this time
    assert start_run() == first


def test_ddp_predict_writes_and_counts_every_image(ddp_fit, odd_shapes):
    checkpoint = ddp_fit / "shapes" / "frontend" / "version_0" / "checkpoints" / "last.ckpt"
    output = ddp_fit.parent / "predictions"
    out = run_ddp("predict", *odd_args(odd_shapes, ddp_fit, f"--ckpt_path={checkpoint}"),
                  *DDP, f"--output={output}", cwd=ddp_fit.parent)
    assert len(list((output / "index").glob("*.png"))) == VAL_IMAGES  # 3 + 2, none twice
    assert f"wrote {VAL_IMAGES} predictions to {output}" in out  # both processes' shares


def test_a_second_node_launched_by_hand_makes_no_directory(tmp_path, monkeypatch):
    """NODE_RANK=1 (Lightning's multi-node launch without torchrun or SLURM): node 0 makes the
    run's version_N; node 1 used to claim an empty one of its own."""
    monkeypatch.delenv("DILATEDSEG_RUN_DIR", raising=False)
    monkeypatch.setenv("NODE_RANK", "1")
    run_dir = resolve_run_dir(str(tmp_path / "runs"), "shapes", "frontend", "fit")
    assert run_dir.parent == tmp_path / "runs/shapes/frontend"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("env, name", [
    ({"TORCHELASTIC_RUN_ID": "abc", "RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1"},
     "torchrun-abc"),
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, "slurm-77"),
])
def test_only_global_rank_zero_makes_a_jobs_run_dir(tmp_path, monkeypatch, env, name):
    """The first process of node 1 (LOCAL_RANK 0) used to make the job's directory too: when
    the start failed, rank 0 took back its own and left node 1's, an empty torchrun-<id>."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run_dir = resolve_run_dir(str(tmp_path / "runs"), "shapes", "frontend", "fit")
    assert run_dir == tmp_path / "runs/shapes/frontend" / name
    assert not (tmp_path / "runs").exists()


def test_torchrun_without_a_run_id_is_refused(tmp_path, monkeypatch):
    from dilatedseg.runs import RunError

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RunError, match="--rdzv-id"):
        resolve_run_dir(str(tmp_path), "shapes", "frontend", "fit")


def test_sigterm_stops_with_a_failure_status_and_keeps_the_run(tiny_shapes, tmp_path):
    """`kill` (SIGTERM, as schedulers send) mid-training: Lightning stops cleanly, the command
    exits 143 saying so (make train must not go on to the next stage), nothing is lost."""
    import signal
    import time

    runs = tmp_path / "runs"
    process = subprocess.Popen(
        [sys.executable, "-m", "dilatedseg.cli", "fit",
         *shapes_args(tiny_shapes, runs, "--trainer.max_epochs=1000")],
        env=fresh_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = runs / "shapes/frontend/version_0/checkpoints/last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    assert f"interrupted by SIGTERM; resume it with --ckpt_path={last}" in err
    run = last.parent.parent
    summary = json.loads((run / "summary.json").read_text())
    assert summary["history"] and last.is_file() and (run / "config.yaml").is_file()


def cache_on_rank(rank: int, root: Path, cache_dir: Path, sent: list):
    """Set up and attach a FrontendLogitsCache as global rank ``rank`` of 2 processes does
    (rank 0 appends what it broadcasts to ``sent``, rank 1 receives that); the data module."""
    import torch

    from dilatedseg.data import ShapesDataModule
    from dilatedseg.features import FrontendLogitsCache
    from dilatedseg.module import SegmentationModule

    data = ShapesDataModule(root=str(root), train_size=32, val_size=8, test_size=8,
                            num_workers=0)
    data.setup("fit")
    torch.manual_seed(0)  # the same front-end on both ranks
    module = SegmentationModule(4, stage="context", arch="tiny", padding="same",
                                dilations=[1, 2], feature_cache=True,
                                feature_cache_dir=str(cache_dir))
    receive = (lambda obj, src=0: sent.append(obj) or obj) if rank == 0 else (
        lambda obj, src=0: sent.pop(0))
    trainer = SimpleNamespace(
        datamodule=data, is_global_zero=rank == 0, global_rank=rank, world_size=2,
        limit_train_batches=1.0, limit_val_batches=1.0, default_root_dir=str(cache_dir),
        strategy=SimpleNamespace(root_device=torch.device("cpu"), broadcast=receive,
                                 barrier=lambda name=None: None))
    callback = FrontendLogitsCache(str(cache_dir))
    callback.setup(trainer, module, "fit")
    callback.on_fit_start(trainer, module)
    return data


def test_other_nodes_use_the_feature_cache_rank_zero_built(tiny_shapes, tmp_path):
    """A node with its own copy of the data (its files' times differ, so its cache key does)
    used to look for a cache under its own key and fail on a missing index.json."""
    copy = tmp_path / "node1" / "shapes"
    shutil.copytree(tiny_shapes, copy, copy_function=shutil.copy)  # new mtimes
    sent = []
    rank0 = cache_on_rank(0, tiny_shapes, tmp_path / "cache", sent)
    built = [rank0.datasets[split].directory for split in ("train", "val")]
    assert [directory.parent for directory in built] == [tmp_path / "cache"] * 2
    rank1 = cache_on_rank(1, copy, tmp_path / "cache", sent)
    assert [rank1.datasets[split].directory for split in ("train", "val")] == built
    assert len(rank1.datasets["train"]) == 32


def test_a_node_that_cannot_see_the_feature_cache_says_so(tiny_shapes, tmp_path):
    """Without a shared filesystem the cache rank 0 built is not on this node: one RunError
    with the two ways out, not a FileNotFoundError traceback."""
    from dilatedseg.runs import RunError

    sent = [tmp_path / "on-node-0" / "train-0123"]
    with pytest.raises(RunError, match="process 1 cannot see .*on-node-0/train-0123.* shares; "
                                       r".*--model.feature_cache=false"):
        cache_on_rank(1, tiny_shapes, tmp_path / "cache", sent)


# Two torchrun nodes on one machine: examples/torchrun.sh started twice on localhost (c10d
# rendezvous), one process each, as NNODES=2 on two machines with a shared filesystem.
JOB_ID = "twonodes"


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_node(stage: str, master: str, data: Path, runs: Path, **env: str) -> subprocess.Popen:
    """One node's `examples/torchrun.sh` (NNODES=2, NPROC=1), training one tiny epoch."""
    args = shapes_args(data, runs, "--trainer.max_epochs=1")
    assert args[0] == "--config"  # the script passes the dataset's config itself
    return subprocess.Popen(
        [str(REPO / "examples/torchrun.sh")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=fresh_env(NNODES="2", NPROC="1", MASTER=master, JOB_ID=JOB_ID,
                                 STAGE=stage, ARGS=" ".join(args[2:]), **env))


def node_output(node: subprocess.Popen, timeout: float) -> str:
    """What a node printed once it ended; stopped (SIGTERM: torchrun stops its workers) after
    ``timeout`` seconds."""
    try:
        return node.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        node.terminate()
        return node.communicate(timeout=60)[0] + f"\n(stopped after {timeout} s)"


def run_two_nodes(stage: str, data: list[Path], runs: Path) -> None:
    master = f"127.0.0.1:{free_port()}"
    nodes = [start_node(stage, master, root, runs) for root in data]
    outputs = [node_output(node, timeout=300) for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, "\n----\n".join(output[-3000:] for output in outputs)


@pytest.fixture(scope="module")
def two_nodes(tiny_shapes, tmp_path_factory) -> Path:
    """The front-end, then the context stage (init_from: auto, feature cache), each trained
    one epoch by two torchrun nodes. Node 1 reads its own copy of the data, as a node-local
    copy would be (other path and file times); runs/ is shared."""
    root = tmp_path_factory.mktemp("two_nodes")
    node_copy = root / "node1" / "shapes"
    shutil.copytree(tiny_shapes, node_copy, copy_function=shutil.copy)
    for stage in ("frontend", "context"):
        run_two_nodes(stage, [tiny_shapes, node_copy], root / "runs")
    return root / "runs"


@pytest.mark.parametrize("stage", ["frontend", "context"])
def test_two_torchrun_nodes_share_one_run_written_by_rank_zero(two_nodes, tiny_shapes, stage,
                                                               monkeypatch):
    """Both nodes agree on torchrun-<JOB_ID> (no directory of node 1's own); rank 0 writes
    config, checkpoints and summary; the summary's validation scores equal a single process's
    `dilatedseg validate` of the best checkpoint (context: from rank 0's cached logits)."""
    assert sorted(p.name for p in (two_nodes / "shapes").iterdir()) == [
        "cache", "context", "frontend"]
    stage_dir = two_nodes / "shapes" / stage
    assert [p.name for p in stage_dir.iterdir()] == [f"torchrun-{JOB_ID}"]
    run_dir = stage_dir / f"torchrun-{JOB_ID}"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["num_nodes"] == 2 and saved["model"]["stage"] == stage
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"] == str(run_dir) and len(summary["history"]) == 1
    assert summary["history"][0]["step"] == 2  # 32 images / (batch 8 x 2 processes)
    best = Path(summary["best_checkpoint"])
    assert best.parent == run_dir / "checkpoints" and best.is_file()
    if stage == "context":
        assert saved["model"]["init_from"].startswith(str(two_nodes / "shapes/frontend"))
        caches = sorted(p.name.split("-")[0] for p in (two_nodes / "shapes/cache").iterdir())
        assert caches == ["train", "val"]  # one each (built by rank 0, read by both nodes)

    monkeypatch.chdir(two_nodes.parent)
    run_cli("validate", *shapes_args(tiny_shapes, two_nodes, f"--ckpt_path={best}",
                                     "--trainer.accelerator=cpu", "--trainer.devices=1"))
    single = logged_metrics(stage_dir / "validate_0")
    scores = [k for k in single if k.startswith("val/IoU/") or k in ("val/mIoU", "val/loss")]
    assert len(scores) == 6  # mIoU, loss and 4 classes
    for key in scores:
        assert summary["history"][0][key] == pytest.approx(single[key], abs=1e-4), key
    assert summary["best_val_mIoU"] == pytest.approx(single["val/mIoU"], abs=1e-4)


def test_a_node_left_alone_stops_after_join_timeout(tiny_shapes, tmp_path):
    """One node of NNODES=2 alone: torchrun gives up after JOIN_TIMEOUT seconds, and nothing
    has been written (no process started)."""
    node = start_node("frontend", f"127.0.0.1:{free_port()}", tiny_shapes, tmp_path / "runs",
                      JOIN_TIMEOUT="2")
    output = node_output(node, timeout=60)
    assert node.returncode != 0 and "RendezvousTimeoutError" in output, output[-3000:]
    assert not (tmp_path / "runs").exists()
