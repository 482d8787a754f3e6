"""Reading checkpoints, and the checks a checkpoint must pass before a run uses it: readable,
holding a state dict, trained on the data's classes, resumed in a run of its own dataset and
stage. Each failure is a RunError that names the file and the fix."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from dilatedseg.runs import RunError, checkpoint_run_dir


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents on the CPU, tensors memory-mapped (read only when used); files
    in PyTorch's legacy (pre-zip) format, which cannot be mapped, are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_hparams(path: str) -> dict:
    """The hyperparameters saved in a checkpoint ({} for a bare state dict), read without
    loading its tensors; a missing or unreadable file is a RunError."""
    if not Path(path).is_file():
        raise RunError(f"checkpoint {path} does not exist: check the path (runs/<dataset>/"
                       "<stage>/<version>/checkpoints/ holds best-*.ckpt and last.ckpt)")
    try:
        checkpoint = read_checkpoint(path)
    except Exception as error:  # torch raises many kinds for a file that is not a checkpoint
        # (The weights-only unpickler's own message suggests weights_only=False: not for us.)
        detail = "damaged, or not a checkpoint" if isinstance(error, pickle.UnpicklingError) \
            else str(error).strip().splitlines()[0][:200]
        raise RunError(f"{path} is not a PyTorch checkpoint torch.load can read ({detail})"
                       ) from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or \
            not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise RunError(f"{path} holds no state dict (a checkpoint's 'state_dict', or a dict of "
                       "tensors): pass a checkpoint that dilatedseg or Lightning saved")
    hparams = checkpoint.get("hyper_parameters", {})
    if not isinstance(hparams, dict):
        raise RunError(f"{path}: its 'hyper_parameters' are not a dict: pass a checkpoint that "
                       "dilatedseg or Lightning saved")
    return dict(hparams)


def check_classes(path: str, hparams: dict, datamodule) -> None:
    """A checkpoint trained on other classes than the data's cannot be loaded into its model."""
    names = hparams.get("class_names")
    if names is None:
        return
    if len(names) != datamodule.num_classes:
        raise RunError(
            f"{path} was trained on {len(names)} classes ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}), but {datamodule.name} has "
            f"{datamodule.num_classes}: use a checkpoint trained on {datamodule.name}")


def check_frontend(path: str, hparams: dict, arch: str, padding: str) -> None:
    """A checkpoint's front-end must be of the model's arch and geometry: one trained with
    the other padding has the same weight shapes, so it would load, and then compute other
    logits than it was trained to (a frozen front-end in the context stage never adapts)."""
    ours = {"arch": arch, "padding": padding}
    theirs = {key: hparams[key] for key in ours if hparams.get(key) is not None}
    differ = [key for key in theirs if theirs[key] != ours[key]]
    if differ:
        from dilatedseg.models.frontend import context_margin

        trained = ", ".join(f"{key}={theirs[key]}" for key in differ)
        options = " ".join(f"--model.{key}={theirs[key]}" for key in differ)
        margin = context_margin(theirs.get("arch", arch), theirs.get("padding", padding))
        raise RunError(
            f"{path} holds a front-end trained with {trained}, but this model has "
            f"{', '.join(f'{key}={ours[key]}' for key in differ)}: set {options} (training "
            f"crops then carry --data.init_args.context_margin={margin}), or start from a "
            "checkpoint of this front-end")


def check_resume_stage(ckpt_path: str, hparams: dict, stage: str) -> None:
    """Resuming continues the checkpoint's run: it must be of the stage being trained."""
    trained = hparams.get("stage")
    if trained and trained != stage:
        raise RunError(
            f"{ckpt_path} is a checkpoint of stage '{trained}', and --ckpt_path resumes "
            f"that run: to resume it use --config conf/stage/{trained}.yaml; to start stage "
            f"'{stage}' from its weights use --model.init_from={ckpt_path} instead")


def check_resume_dir(ckpt_path: str, dataset: str, stage: str) -> None:
    """Resuming continues in the checkpoint's run directory: it must be a run of this dataset
    and stage, or the run would write into (and mix up) another one."""
    run_dir = checkpoint_run_dir(ckpt_path)
    if run_dir is None:
        return  # not in a run directory: the resumed run gets a new one
    if (run_dir.parent.parent.name, run_dir.parent.name) != (dataset, stage):
        raise RunError(
            f"{ckpt_path} belongs to the run {run_dir}, not to a {dataset} / {stage} run; "
            "--ckpt_path resumes that run in its directory. To start from its weights use "
            f"--model.init_from={ckpt_path}")
