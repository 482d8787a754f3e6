"""The `dilatedseg` command: LightningCLI (fit / validate / test / predict) plus extra verbs.

    dilatedseg fit --config conf/shapes.yaml [--config conf/stage/context.yaml] [--model.x=..]
    dilatedseg prepare <dataset> --root DIR        convert / generate a dataset
    dilatedseg sweep sweeps/X.yaml --local          run a W&B sweep without a server
    dilatedseg summary --dataset shapes             table of the latest run of each stage

Every run writes to runs/<dataset>/<stage>/<version>/: the resolved config.yaml, checkpoints/
(best by val/mIoU and last.ckpt), the logger's files and summary.json.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import signal
import sys
import typing
import warnings
from pathlib import Path

from dilatedseg.openmp import shorten_openmp_spinning

shorten_openmp_spinning()  # before torch loads

import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dilatedseg.checkpoints import (
    check_classes,
    check_frontend,
    check_resume_dir,
    check_resume_stage,
    checkpoint_hparams,
)
from dilatedseg.cli_parser import (
    SUBCOMMANDS,
    ConciseParser,
    config_arguments,
    model_options,
    read_ints_as_ints,
)
from dilatedseg.data import SegmentationDataModule
from dilatedseg.data.base import DataError
from dilatedseg.inference import check_deploy_tiles
from dilatedseg.job_restarts import JobRestarts
from dilatedseg.loggers import configure_logger, wandb_server_error
from dilatedseg.models.caffemodel import check_caffe_input
from dilatedseg.models.frontend import check_context_margin
from dilatedseg.models.weights import WeightsError
from dilatedseg.module import SegmentationModule, check_hyperparameters
from dilatedseg.runs import (
    COMMAND_FILE,
    RunError,
    attempt_dir,
    discard_unused_run_dirs,
    find_previous_checkpoint,
    forget_earlier_runs,
    is_global_rank_zero,
    lock_run_dir,
    release_run_lock,
    resolve_checkpoint_alias,
    resolve_run_dir,
    restart_checkpoint,
    resume_advice,
    run_interrupted,
    run_started,
    watch_requeue,
)
from dilatedseg.summary import RunSummary
from dilatedseg.wandb_images import WandbImages

# Model options that may differ between training a checkpoint and evaluating it.
EVALUATION_OPTIONS = ("crf", "crf_options", "tile_size", "tile_whole_network")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the checkout: conf/, sweeps/
PACKAGE_CONF = PACKAGE_ROOT / "conf"


def project_file(relative: str) -> Path | None:
    """``relative`` (e.g. conf/base.yaml) in the working directory if it is there, else in the
    package checkout; None when neither has it."""
    for root in (Path("."), PACKAGE_ROOT):
        if (root / relative).is_file():
            return root / relative
    return None


def base_config() -> list[str]:
    """conf/base.yaml of the working directory if there is one, else the package checkout's."""
    base = project_file("conf/base.yaml")
    return [str(base)] if base else []


def checkout_configs(argv: list[str]) -> list[str]:
    """``argv`` with each relative ``--config`` file that the working directory lacks read from
    the package checkout, as conf/base.yaml is (a `wandb agent` started elsewhere runs a
    sweep's ``--config conf/...``); stderr names each. One in neither place stays, for the
    parser's error (see :func:`~dilatedseg.cli_parser.missing_config_problem`)."""
    located, notes = list(argv), []
    for index, path in config_arguments(argv):
        found = PACKAGE_ROOT / path
        if (is_config_text(path) or Path(path).is_absolute() or Path(path).is_file()
                or not found.is_file()):
            continue
        notes.append(f"--config {path}: not in the working directory; reading the package "
                     f"checkout's {found}\n")
        located[index] = str(found) if argv[index] == path else f"--config={found}"
    if is_global_rank_zero():
        sys.stderr.write("".join(notes))
    return located


def is_config_text(value: str) -> bool:
    """Whether jsonargparse reads a --config value as the config itself (YAML that is no
    string, e.g. ``{model: {lr: 0.1}}``) rather than as a file name (which it must be asked
    first: a long one makes Path.is_file raise 'File name too long')."""
    try:
        return not isinstance(yaml.safe_load(value), str)
    except yaml.YAMLError:
        return True  # (jsonargparse says what is wrong with it)


def config_model(value: str) -> dict:
    """The model section of a --config value: the file's, or the YAML given inline; empty
    for a file that is not there or YAML that does not parse (the parser names either)."""
    try:
        if is_config_text(value):
            config = yaml.safe_load(value)
        elif Path(value).is_file():
            config = yaml.safe_load(Path(value).read_text())
        else:
            return {}
    except yaml.YAMLError:
        return {}
    return (config.get("model") or {}) if isinstance(config, dict) else {}


def stage_configs(conf: Path, dataset: str, stage: str) -> list[str]:
    """The --config arguments of one stage, as `make train STAGE=<stage> DATASET=<dataset>`
    composes them: <conf>/<dataset>.yaml, <conf>/stage/<stage>.yaml, then the dataset's own
    overlay <conf>/<dataset>/<stage>.yaml where there is one."""
    files = [conf / f"{dataset}.yaml", conf / "stage" / f"{stage}.yaml"]
    if (conf / dataset / f"{stage}.yaml").is_file():
        files.append(conf / dataset / f"{stage}.yaml")
    return [arg for path in files for arg in ("--config", str(path))]


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config into ``directory`` (the run's, or a resumed start's, see
    :func:`~dilatedseg.runs.attempt_dir`; not the logger's), on rank 0 only."""

    def __init__(self, *args, directory: str | None = None, command_line: list[str] = (),
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.directory, self.command_line = directory, list(command_line)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        directory = Path(self.directory or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, directory / self.config_filename, skip_unset=False,
                         overwrite=True, multifile=False)
        (directory / COMMAND_FILE).write_text(shlex.join(self.command_line))
        for logger in trainer.loggers:  # the full resolved config travels with the W&B run
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(self.config.as_dict())


class DilatedSegCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        # What the user typed: an evaluation option set to none / null there is still set.
        self.command_line = [str(a) for a in (sys.argv[1:] if args is None else args)]
        self.checked_ahead: set[str] = set()  # the data module's loaders check_data checked
        super().__init__(
            SegmentationModule,
            SegmentationDataModule,
            subclass_mode_data=True,
            parser_class=ConciseParser,
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"save_to_log_dir": False, "overwrite": True},
            parser_kwargs={
                "parser_mode": "omegaconf",
                **{verb: {"default_config_files": base_config()} for verb in SUBCOMMANDS},
            },
            args=args,
            run=run,
        )

    def parse_arguments(self, parser, args) -> None:
        """Parses the command line (``args``, else sys.argv) with each relative --config file
        that the working directory lacks read from the package checkout, then reads the
        --ckpt_path checkpoint (:meth:`read_checkpoint`)."""
        self.located_args = checkout_configs(self.command_line)
        self.config = parser.parse_args(self.located_args)
        self.read_checkpoint()

    def read_checkpoint(self) -> None:
        """--ckpt_path last / best names a checkpoint file; its saved hyperparameters are read
        (Lightning rebuilds the model from them after parse_arguments: the model it was trained
        as); resuming, it must be of the stage being trained. What the user typed is noted for
        :meth:`keep_evaluation_options`."""
        subcommand = self.config.get("subcommand")
        self.checkpoint_hparams, self.asked_options, self.typed_values = {}, {}, {}
        if not subcommand or not self.config[subcommand].get("ckpt_path"):
            return
        config = self.config[subcommand]
        dataset = import_class(config.data.class_path).name
        ckpt_path = resolve_checkpoint_alias(config.ckpt_path, config.runs_dir, dataset,
                                             config.model.stage)
        if ckpt_path != config.ckpt_path and is_global_rank_zero():
            print(f"ckpt_path: {config.ckpt_path} -> {ckpt_path}", file=sys.stderr)
        config.ckpt_path = ckpt_path
        self.checkpoint_hparams = checkpoint_hparams(ckpt_path)
        if subcommand == "fit":
            check_resume_stage(ckpt_path, self.checkpoint_hparams, config.model.stage)
        else:
            self.asked_options = self.evaluation_options_set(config.model)
        self.typed_values = {key: config.model.get(key)
                             for key in typed_model_options(self.command_line)}

    def keep_evaluation_options(self) -> None:
        """Once the checkpoint's hyperparameters rebuilt the model: the evaluation-only options
        the user set (a post-processing CRF, tiling) win, and a line names each typed --model
        option that the checkpoint's value replaced."""
        subcommand = self.config.get("subcommand")
        if not subcommand or not self.config[subcommand].get("ckpt_path"):
            return
        model = self.config[subcommand].model
        for key, value in self.asked_options.items():
            model[key] = value
        replaced = [f"--model.{key}={value} by its {model.get(key)}"
                    for key, value in self.typed_values.items() if model.get(key) != value]
        if replaced and is_global_rank_zero():
            print(f"--ckpt_path keeps the checkpoint's model, replacing {', '.join(replaced)}: "
                  "for other model options, start from its weights with "
                  f"--model.init_from={self.config[subcommand].ckpt_path}", file=sys.stderr)

    def evaluation_options_set(self, model) -> dict:
        """The evaluation options the user set: typed (none / null included), or other than
        their default (none, null, false: then the checkpoint's value stays)."""
        typed = typed_options(self.located_args)  # (its --config files as read)
        return {key: model.get(key) for key in EVALUATION_OPTIONS
                if key in typed or model.get(key) not in (None, "none", False)}

    def add_arguments_to_parser(self, parser) -> None:
        read_ints_as_ints(parser)
        parser.add_argument("--runs_dir", default="runs", help="root of all run directories")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.mean_rgb", "model.pixel_mean", apply_on="instantiate")
        parser.link_arguments("data.categories", "model.categories", apply_on="instantiate")
        parser.add_argument("--output", default=None,
                            help="predict: output folder (default <run dir>/predictions)")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(WandbImages, "wandb_images")  # no-op without W&B
        parser.set_defaults({
            "checkpoint.monitor": "val/mIoU",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,  # also see instantiate_trainer
            "checkpoint.enable_version_counter": False,  # one last.ckpt (names hold the epoch)
            "checkpoint.save_top_k": 1,
            "checkpoint.filename": "best-epoch{epoch:03d}-miou{val/mIoU:.2f}",
            "checkpoint.auto_insert_metric_name": False,
        })

    def before_instantiate_classes(self) -> None:
        """Keeps the evaluation options the user set over the checkpoint's, checks what can fail
        before anything is built, fetched or written (data files, checkpoints, predict's output
        folder), then resolves init_from, precision and the run directory."""
        self.keep_evaluation_options()
        config = self.config[self.subcommand] if self.subcommand else self.config
        datamodule = self.check_data(config)
        if self.subcommand == "fit":
            check_trains_something(config.trainer)
        dataset, stage = datamodule.name, config.model.stage
        if datamodule.crop_size is not None and self.subcommand == "fit":
            with configuration_errors():
                check_context_margin(datamodule.context_margin, config.model.arch,
                                     config.model.padding)
        if config.model.init_from == "auto":
            config.model.init_from = str(find_previous_checkpoint(config.runs_dir, dataset, stage))
            if is_global_rank_zero():
                print(f"init_from: auto -> {config.model.init_from}", file=sys.stderr)
        self.check_weights(config, datamodule)
        with configuration_errors():
            check_hyperparameters(config.model)  # (a tile_size the check below can use)
        if not (self.subcommand == "fit" and config.model.feature_cache):  # (cached: no tiles)
            check_tiles(config.model, datamodule)
        if self.subcommand == "predict" and config.get("output"):
            check_predict_output(Path(config.output))
        if config.trainer.get("precision") is None:
            config.trainer.precision = default_precision(config.trainer.get("accelerator"))
        self.set_up_run_dir(config, dataset, stage)

    def set_up_run_dir(self, config, dataset: str, stage: str) -> None:
        """Choose the run directory (and lock it for a fit), and point the checkpoints, the
        saved config and the loggers into it."""
        run_dir = resolve_run_dir(config.runs_dir, dataset, stage, self.subcommand,
                                  config.get("ckpt_path"), shlex.join(self.command_line))
        if self.subcommand == "fit" and is_global_rank_zero():
            lock_run_dir(run_dir)  # one training at a time in a run directory
        if self.subcommand == "fit":
            watch_requeue()  # (what resume_advice says when the job stops)
        resume = restart_checkpoint(run_dir) if self.subcommand == "fit" else None
        given = config.get("ckpt_path")  # (the job's command: where its first start began)
        if resume and (not given or resume.stat().st_mtime > Path(given).stat().st_mtime):
            config.ckpt_path = str(resume)  # a requeued job goes on where it stopped
            if is_global_rank_zero():
                print(f"restarted job: resuming from {resume}", file=sys.stderr)
        config.trainer.default_root_dir = str(run_dir)
        config.checkpoint.dirpath = str(run_dir / "checkpoints")
        attempt = attempt_dir(run_dir)  # config.yaml and CSV logs of this start
        self.save_config_kwargs.update(directory=str(attempt), command_line=self.command_line)
        if self.subcommand == "predict":
            config.return_predictions = False  # the PredictionWriter writes them to disk
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if hasattr(logger, "class_path"):
                configure_logger(logger, run_dir, dataset, stage, attempt)

    def check_weights(self, config, datamodule) -> None:
        """The checkpoint to resume or evaluate, or else init_from, must exist and fit the
        data's classes; resuming continues a run of this dataset and stage."""
        ckpt_path, init_from = config.get("ckpt_path"), config.model.init_from
        if ckpt_path:
            check_classes(ckpt_path, self.checkpoint_hparams, datamodule)
            if self.subcommand == "fit":
                check_resume_dir(ckpt_path, datamodule.name, config.model.stage)
            else:  # evaluating it: its weights replace ImageNet's, which need not be read
                config.model.pretrained = None
        elif init_from and not str(init_from).endswith(".caffemodel"):
            hparams = checkpoint_hparams(init_from)
            check_classes(init_from, hparams, datamodule)
            check_frontend(init_from, hparams, config.model.arch, config.model.padding)
        elif init_from:  # the authors' model: its shapes are checked as it loads
            try:
                check_caffe_input(init_from, config.model.pixel_std)
            except WeightsError as error:
                raise RunError(str(error)) from None
        elif self.subcommand != "fit":  # nothing trained to evaluate: random class scores
            raise RunError(
                f"{self.subcommand} needs trained weights: pass --ckpt_path=best (the best "
                "checkpoint of this dataset and stage's latest run), --ckpt_path=runs/<dataset>/"
                "<stage>/<version>/checkpoints/best-....ckpt, or --model.init_from=PATH")

    def check_data(self, config) -> SegmentationDataModule:
        """Missing or malformed data (files, label values, batches) fails here, before the
        model fetches weights or the trainer starts a W&B run or other processes. Returns a
        data module built for the check."""
        data = import_class(config.data.class_path)
        with configuration_errors():
            init_args = config.data.get("init_args")
            datamodule = data(**(init_args.as_dict() if init_args is not None else {}))
        # the subcommand names the stage
        datamodule.check_data(self.subcommand, known_world_size(config.trainer))
        self.checked_ahead = datamodule.checked_ahead
        return datamodule

    def note_checkpoint(self) -> None:
        # A --ckpt_path (resuming, or evaluating it) holds every weight: the model starts from
        # it, not from init_from (which may be gone since); see load_initial_weights.
        self.model.checkpoint_path = self.config[self.subcommand].get("ckpt_path")

    before_fit = before_validate = before_test = before_predict = note_checkpoint

    def instantiate_classes(self) -> None:
        """Build data, model and trainer; a value they refuse is a configuration error (one
        line, exit 2), not a traceback: nothing has trained yet."""
        with configuration_errors():
            super().instantiate_classes()
        self.datamodule.checked_ahead = set(self.checked_ahead)  # by check_data: not again

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.extend([RunSummary(), JobRestarts()])
        if self.subcommand != "fit":
            # An evaluation saves no checkpoint: Lightning's advice to add the callbacks that
            # wrote the --ckpt_path file, and its note that their dirpath changed, do not apply.
            for message in ("Be aware that when using `ckpt_path`", "The dirpath has changed"):
                warnings.filterwarnings("ignore", message=re.escape(message))
        if self.subcommand == "fit":
            # checkpoints/last.ckpt after every validation (every epoch without validation), to
            # resume from: since Lightning 2.6 the best checkpoint's save_last writes it only
            # when the best improves (and at the end of a run that never saved it), so a resume
            # could repeat epochs.
            trainer.callbacks.append(ModelCheckpoint(
                dirpath=self.config.fit.checkpoint.dirpath, filename="last",
                enable_version_counter=False))
        if self.subcommand == "predict":
            from dilatedseg.predict_writer import PredictionWriter

            config = self.config[self.subcommand]
            output = config.get("output") or Path(trainer.default_root_dir) / "predictions"
            trainer.callbacks.append(PredictionWriter(output))
        return trainer


def check_trains_something(trainer) -> None:
    """A fit whose length is 0 (epochs, steps or training batches) stops at once, leaving an
    empty run, and exits 0 as if it had trained."""
    fixes = {"max_epochs": "-1: no epoch limit", "max_steps": "-1: no step limit",
             "limit_train_batches": "1.0: all of them; to score a checkpoint without training, "
                                    "use dilatedseg validate"}
    for key, fix in fixes.items():
        if trainer.get(key) == 0:
            raise RunError(f"bad configuration: --trainer.{key}=0 trains nothing: give it at "
                           f"least 1 ({fix})")


def check_tiles(model, datamodule: SegmentationDataModule) -> None:
    """``tile_whole_network`` stops at the first evaluated image that needs several tiles along
    an axis whose ``tile_size`` is no multiple of 8: find it in the data checked ahead (image
    headers) before the model is built."""
    tile = model.get("tile_size")
    if not model.get("tile_whole_network") or tile is None:
        return
    tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
    for split in datamodule.checked_ahead - {"train"}:
        for size in sorted(datamodule.image_sizes(split)):
            check_deploy_tiles(size, tile)


def known_world_size(trainer) -> int | None:
    """The run's process count (devices x num_nodes) as far as the trainer config tells it
    before the trainer exists; None where it depends on the machine: devices "auto" (but on
    the CPU, where it is 1) or -1 (every GPU there is)."""
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1)
    if isinstance(devices, str) and devices.strip() == "auto":
        devices = 1 if trainer.get("accelerator") == "cpu" else None
    elif isinstance(devices, str) and "," in devices:  # "0,1": device ids
        devices = len([i for i in devices.split(",") if i.strip()])
    elif isinstance(devices, str):
        devices = int(devices) if devices.strip().lstrip("-").isdigit() else None
    elif isinstance(devices, (list, tuple)):
        devices = len(devices)
    if not isinstance(devices, int) or devices < 1 or not isinstance(nodes, int) or nodes < 1:
        return None  # (-1, or a value the trainer refuses itself)
    return devices * nodes


def check_predict_output(output: Path) -> None:
    """predict --output must be a folder that holds no earlier predictions (they would be
    overwritten, or mixed with these)."""
    from dilatedseg.predict_writer import earlier_predictions

    if output.exists() and not output.is_dir():
        raise RunError(f"--output={output} is a file: name a folder for the predictions")
    earlier = earlier_predictions(output)
    if earlier:
        folders = ", ".join(f"{folder.name}/" for folder in earlier)
        raise RunError(
            f"--output={output} already holds predictions ({folders}): they would be "
            "overwritten or mixed with these. Name a new folder, or move or delete that one "
            "first")


def typed_model_options(command_line: list[str]) -> list[str]:
    """The keys of the ``--model.<key>`` options on the command line (``crf_options`` for
    ``--model.crf_options.iterations``)."""
    return [name.split(".")[0] for name in model_options(command_line)]


def typed_options(command_line: list[str]) -> set[str]:
    """The evaluation options the user set, none / null included: as a whole
    ``--model.<key>`` option or in a ``--config`` (a file, or YAML inline) on the command line."""
    typed = {name for name in model_options(command_line) if name in EVALUATION_OPTIONS}
    for _, value in config_arguments(command_line):
        typed |= {key for key in EVALUATION_OPTIONS if key in config_model(value)}
    return typed


@contextlib.contextmanager
def configuration_errors():
    """A value an __init__ refuses (ValueError, Lightning's MisconfigurationException) or an
    option it does not take (TypeError; also Lightning's for an option of the wrong type, which
    names it in backticks) is one `bad configuration` line."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except (ValueError, MisconfigurationException) as error:
        raise RunError(f"bad configuration: {error}") from None
    except TypeError as error:  # other TypeErrors are bugs
        if "argument" not in str(error) and "`" not in str(error):
            raise
        raise RunError(f"bad configuration: {error}") from None


def default_precision(accelerator) -> str:
    """The trainer's precision when the config leaves it null: bf16 autocast where the run goes
    to a CUDA GPU that computes in bf16 (tensor cores: Ampere or newer), else float32."""
    on_gpu = accelerator in (None, "auto", "gpu", "cuda") and torch.cuda.is_available()
    native = on_gpu and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16-mixed" if native else "32-true"


def import_class(class_path: str):
    import importlib

    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


VERB_HELP = """dilatedseg: fit / validate / test / predict (LightningCLI, below), and
  prepare <dataset> --root DIR   convert / check a dataset (prepare --help)
  sweep sweeps/X.yaml --local    run a W&B sweep without a server
  summary --dataset NAME         val mIoU of the latest run of each stage
"""


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    verb = args[0] if args else ""
    if verb in ("", "-h", "--help"):  # LightningCLI's help lists only its own subcommands
        print(VERB_HELP)
    forget_earlier_runs()
    try:
        run_verb(verb, args[1:], argv)
    except SIGTERMException:  # Lightning stopped cleanly, but the run did not finish
        exit_interrupted(verb, "interrupted by SIGTERM", signal.SIGTERM)
    except SystemExit as exit_:  # Lightning exits 1 after Ctrl-C, saying only that
        if exit_.code != 1 or not run_interrupted():
            raise
        exit_interrupted(verb, "interrupted (Ctrl-C)", signal.SIGINT)
    except (DataError, RunError) as error:
        # Found while training (a damaged file among those not read before): the run stays.
        advice = resume_advice(verb) if run_started() else ""
        discard_unused_run_dirs()
        sys.stderr.write(f"error: {clean_message(error)}\n")
        if advice:
            sys.stderr.write(f"(the run stopped after it had started; once that is fixed, "
                             f"{advice})\n")
        raise SystemExit(2) from None
    except Exception as error:
        if not wandb_server_error(error):
            raise
        discard_unused_run_dirs()
        sys.stderr.write(f"error: W&B server error ({clean_message(error)}). On a machine "
                         "without network (a cluster's compute nodes) export WANDB_MODE=offline "
                         "and `wandb sync` the run later from one with network; otherwise "
                         "check your W&B login, entity and project\n")
        raise SystemExit(2) from None
    finally:
        release_run_lock()  # the run is over (a later command in this process may read it)


def run_verb(verb: str, rest: list[str], argv: list[str] | None) -> None:
    """prepare / sweep / summary with their own arguments ``rest``; else LightningCLI, which
    parses ``argv`` (None: sys.argv) itself."""
    if verb == "prepare":
        from dilatedseg.prepare import main as prepare_main

        prepare_main(rest)
    elif verb == "sweep":
        from dilatedseg.sweep import main as sweep_main

        sweep_main(rest)
    elif verb == "summary":
        from dilatedseg.summary import main as summary_main

        summary_main(rest)
    else:
        DilatedSegCLI(args=argv)


def exit_interrupted(verb: str, what: str, signal_number: int) -> typing.NoReturn:
    """Say that the run was interrupted, and how it resumes (by hand, or by itself in a job
    that SLURM requeues or torchrun restarts); exit 128 + the signal."""
    advice = resume_advice(verb, stopped_by_signal=True)
    sys.stderr.write(f"error: {what}{'; ' + advice if advice else ''}\n")
    raise SystemExit(128 + signal_number) from None


def clean_message(error: Exception) -> str:
    """The user-facing part of an error, also when a dataloader worker re-raised it."""
    message = str(error)
    marker = f"{type(error).__name__}: "
    if "Original Traceback" in message and marker in message:
        message = message.rsplit(marker, 1)[-1]
    return message.strip()


if __name__ == "__main__":
    main()
