"""Where the experiment loggers write: CSV / TensorBoard files in the run directory, and the W&B
run (named after the dataset, stage and run; one id per run directory, so resuming continues
it; offline when W&B has no account here)."""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

from dilatedseg.runs import is_global_rank_zero


def configure_logger(logger, run_dir: Path, dataset: str, stage: str,
                     attempt: Path | None = None) -> None:
    """Point a logger's files into the run directory (CSV / TensorBoard: into ``attempt``, this
    start's directory, when a resumed run has one)."""
    args = logger.init_args
    name = logger.class_path.rsplit(".", 1)[-1]
    args.save_dir = str(run_dir)
    if name == "WandbLogger":
        args.name = args.get("name") or f"{dataset}/{stage}/{run_dir.name}"
        args.group = args.get("group") or os.environ.get("WANDB_RUN_GROUP") or dataset
        args.id = args.get("id") or wandb_run_id(run_dir)
        args.resume = args.get("resume") or "allow"  # a known id continues that run
        disabled = os.environ.get("WANDB_MODE") == "disabled"  # honoured: nothing logged
        if not args.get("offline") and not wandb_logged_in() and not disabled:
            args.offline = True  # no account or network: log locally, `wandb sync` later
            if args.get("log_model"):  # WandbLogger refuses it offline
                args.log_model = False
                if is_global_rank_zero():
                    print("W&B logs offline (not logged in): log_model is off, checkpoints stay "
                          "in the run directory", file=sys.stderr)
    elif name in ("CSVLogger", "TensorBoardLogger"):
        args.save_dir, args.name, args.version = str(attempt or run_dir), "", ""
        if name == "CSVLogger" and not (Path(args.save_dir) / "metrics.csv").exists():
            # The directory holds only this start's config.yaml and command.txt (a resumed run
            # logs into its own resume_<k>/): Lightning's "exists and is not empty. Previous
            # log files in this directory will be deleted" would be a false alarm.
            warnings.filterwarnings(
                "ignore", message=f"Experiment logs directory {re.escape(args.save_dir)}")


def wandb_run_id(run_dir: Path) -> str:
    """A W&B run id stored in the run directory, so that resuming continues the same run.

    A `wandb agent` names the run it starts in WANDB_RUN_ID: that id is used (and stored),
    so the sweep's server sees its run report back.
    """
    import uuid

    id_file = run_dir / "wandb_id.txt"
    if os.environ.get("WANDB_RUN_ID"):
        run_id = os.environ["WANDB_RUN_ID"]
    elif id_file.is_file():
        return id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
    if is_global_rank_zero():  # other ranks log nothing to W&B
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
    return run_id


def wandb_server_error(error: BaseException) -> bool:
    """Whether ``error`` is wandb's failure to talk to its server (CommError: no network, or
    the server refused the login, entity or project). Looked up only when wandb was imported
    by the run: the CLI does not import wandb for runs that never log to it."""
    errors = sys.modules.get("wandb.errors")
    return errors is not None and isinstance(error, errors.CommError)


def wandb_logged_in() -> bool:
    """True when W&B has an API key (WANDB_API_KEY or `wandb login`) and is not disabled."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        return False
    from urllib.parse import urlparse

    server = urlparse(os.environ.get("WANDB_BASE_URL", "")).hostname  # a private W&B server
    return any("wandb" in host or host == server for host in hosts)
