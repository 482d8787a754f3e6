"""The LightningModule: stages, loss, metrics, optimiser and freezing. Dataset-agnostic."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from dilatedseg.checkpoints import check_frontend, read_checkpoint
from dilatedseg.inference import predict_logits
from dilatedseg.labels import IGNORE_INDEX
from dilatedseg.metrics import (
    ConfusionMatrix,
    argmax_classes,
    category_iou,
    iou_from_confusion,
    mean_iou,
)
from dilatedseg.models import ContextModule, DenseCRF, FrontEnd, Segmenter
from dilatedseg.models.caffemodel import check_caffe_input, load_caffemodel
from dilatedseg.models.context import resolve_dilations
from dilatedseg.models.frontend import OUTPUT_STRIDE, check_context_margin
from dilatedseg.models.segmenter import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from dilatedseg.models.weights import WeightsError
from dilatedseg.runs import STAGE_ORDER, RunError

CRF_MODES = ("none", "dense", "rnn")


def segmentation_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy averaged over the labelled pixels (255 ignored), in float32
    whatever the precision; 0, not NaN, when every pixel is ignored (without a host sync)."""
    labelled = (label != IGNORE_INDEX).sum().clamp(min=1)
    return F.cross_entropy(logits.float(), label.long(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / labelled


def check_hyperparameters(hp) -> None:
    """A ValueError that names the option and its allowed values, for a value the module cannot
    train or evaluate with."""
    if hp.stage not in STAGE_ORDER:
        raise ValueError(f"stage must be one of {STAGE_ORDER}, got {hp.stage!r}")
    if hp.optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {hp.optimizer!r}")
    if hp.lr_schedule not in ("poly", "step", "constant"):
        raise ValueError(
            f"lr_schedule must be 'poly', 'step' or 'constant', got {hp.lr_schedule!r}")
    if hp.crf not in CRF_MODES:
        raise ValueError(f"crf must be one of {CRF_MODES}, got {hp.crf!r}")
    options = set(inspect.signature(DenseCRF).parameters) - {"num_classes", "trainable"}
    unknown = sorted(set(hp.crf_options or {}) - options) if hp.crf != "none" else []
    if unknown:
        raise ValueError(f"crf_options has no {', '.join(unknown)}: its keys are "
                         f"{', '.join(sorted(options))} (--model.crf picks dense or rnn)")
    if hp.lr <= 0 or not 0 <= hp.momentum < 1 or hp.weight_decay < 0:
        raise ValueError(f"need lr > 0, 0 <= momentum < 1 and weight_decay >= 0, got "
                         f"lr={hp.lr}, momentum={hp.momentum}, weight_decay={hp.weight_decay}")
    tile_size = hp.tile_size
    tiles = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
    if tiles is not None and (len(tiles) != 2 or min(tiles) < OUTPUT_STRIDE):
        raise ValueError(f"tile_size must be at least {OUTPUT_STRIDE} px (the output stride), "
                         f"got {tile_size}: [height, width] in px, or one size")
    if hp.feature_cache and hp.stage != "context":
        raise ValueError("feature_cache needs the frozen front-end of stage 'context', not "
                         f"{hp.stage!r}: set --model.feature_cache=false")


def build_segmenter(hp) -> Segmenter:
    """The stage's :class:`Segmenter`: front-end, a context module after the front-end stage,
    a CRF when ``crf`` asks for one."""
    # init_from's front-end weights replace ImageNet's: don't fetch or read those.
    pretrained = None if hp.init_from else hp.pretrained
    try:
        frontend = FrontEnd(hp.num_classes, arch=hp.arch, padding=hp.padding, dropout=hp.dropout,
                            pretrained=pretrained, fc6_space_to_batch=hp.fc6_space_to_batch)
    except WeightsError as error:
        raise RunError(str(error)) from None
    context = None
    if hp.stage != "frontend":
        context = ContextModule(hp.num_classes, variant=hp.context_variant,
                                dilations=hp.dilations, init=hp.context_init,
                                padding=hp.context_padding)
    dense_crf = None
    if hp.crf != "none":
        dense_crf = DenseCRF(hp.num_classes, trainable=hp.crf == "rnn",
                             **(hp.crf_options or {}))
    return Segmenter(frontend, context, dense_crf, upsample=hp.upsample,
                     pixel_mean=hp.pixel_mean, pixel_std=hp.pixel_std)


class SegmentationModule(L.LightningModule):
    """Trains and evaluates a :class:`Segmenter` in one of the paper's stages.

    Stages: ``frontend`` trains the front-end alone; ``context`` freezes the front-end and
    trains an (identity-initialised) context module on its logits; ``joint`` fine-tunes both;
    ``crf`` fine-tunes front-end + context + CRF-RNN end to end.
    ``init_from`` copies weights from an earlier stage's checkpoint (missing modules keep their
    initialisation); resuming an interrupted run is the trainer's ``ckpt_path`` instead.

    Args:
        num_classes: classes C (linked from the data module by the CLI).
        class_names: names for per-class logging (linked from the data module).
        stage: one of "frontend", "context", "joint", "crf".
        crf: "none"; "dense" = fixed dense CRF as post-processing at validate / test / predict
            (any stage; training ignores it); "rnn" = trainable CRF-RNN, trained end to end
            (the crf stage). crf_options: keyword arguments of :class:`DenseCRF` (thetas,
            kernel weights, iterations, test_iterations).
        arch, padding, dropout, pretrained: the :class:`FrontEnd`.
        context_variant, dilations, context_init, context_padding: the :class:`ContextModule`;
            ``dilations`` is a preset name ("dilation7", "dilation8", "dilation10") or a list.
        upsample: "bilinear", "deconv" (frozen bilinear ConvTranspose2d, Cityscapes), "zoom"
            (logit i at pixel 8i: the authors' VOC / CamVid / KITTI models) or "auto"
            (deconv for the dilation10 schedule, bilinear otherwise).
        pixel_mean, pixel_std: input normalisation in 0-255 RGB (mean linked from the data).
        optimizer: "sgd" (the paper) or "adam". lr, momentum, weight_decay: as usual.
        bias_lr_mult: learning-rate multiplier of biases, which get no weight decay (Caffe).
        lr_schedule: "poly" (power 0.9), "step" (x lr_gamma every lr_step_epochs, or every
            lr_step_iters optimiser steps when set: Caffe's step policy) or "constant".
        init_from: checkpoint whose weights initialise this model (then ``pretrained`` is not
            loaded: the checkpoint's front-end replaces it).
        tile_size: validate / test / predict in tiles of this output size (see
            :func:`dilatedseg.inference.predict_logits`); None = whole images.
        tile_whole_network: with ``tile_size`` (then the authors' deploy output size), compute
            what the authors' test.py computed, the whole network per full-size tile (to
            reproduce their published evaluation with their weights); false (default): only
            the front-end is tiled and the result equals whole-image inference (see
            :mod:`dilatedseg.inference`).
        categories: category of each class (linked from the data module, e.g. Cityscapes):
            then ``<prefix>/catIoU/<name>`` and ``<prefix>/mIoU_category`` are logged too.
        feature_cache: context stage only: compute the frozen front-end's logits once, cache
            them on disk and train on them (:mod:`dilatedseg.features`); batches then carry
            ``frontend_logits`` instead of ``image``. feature_cache_dir: where (None = next to
            the run, ``runs/<dataset>/cache``).
        channels_last: on CUDA, keep weights (hence activations) in NHWC memory format, the
            layout tensor-core convolutions use natively (no effect on CPU).
        compile: ``torch.compile`` the context module and the CRF (launch-bound: many small
            kernels). Off by default: the first steps pay the compilation.
        fc6_space_to_batch: run the dilated fc6 as an undilated convolution on a rearranged
            tensor (:class:`~dilatedseg.models.frontend.SpaceToBatchConv2d`; same weights):
            true, false, or null (default) = where it pays: always on CUDA (H200 bf16: fc6
            forward + backward 5.3x faster), on the CPU in training (~50x faster backward).

    Mixed precision is the trainer's: ``--trainer.precision=bf16-mixed`` runs convolutions in
    bf16 under autocast; the loss and the CRF stay in float32.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: list[str] | None = None,
        stage: str = "frontend",
        arch: str = "vgg16",
        padding: str = "valid",
        dropout: float = 0.5,
        pretrained: str | None = None,
        context_variant: str = "basic",
        dilations: str | list[int] = "dilation8",
        context_init: str = "identity",
        context_padding: str = "same",
        upsample: str = "auto",
        pixel_mean: tuple[float, float, float] = IMAGENET_MEAN_RGB,
        pixel_std: tuple[float, float, float] = IMAGENET_STD_RGB,
        optimizer: str = "sgd",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        bias_lr_mult: float = 2.0,
        lr_schedule: str = "poly",
        lr_step_epochs: int = 10,
        lr_gamma: float = 0.1,
        init_from: str | None = None,
        tile_size: int | tuple[int, int] | None = None,
        tile_whole_network: bool = False,
        categories: list[str] | None = None,
        lr_step_iters: int | None = None,
        feature_cache: bool = False,
        feature_cache_dir: str | None = None,
        crf: str = "none",
        crf_options: dict | None = None,
        channels_last: bool = True,
        compile: bool = False,
        fc6_space_to_batch: bool | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_hyperparameters(self.hparams)
        self.class_names = list(class_names or [str(i) for i in range(num_classes)])
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.model = build_segmenter(self.hparams)
        if stage == "context":
            self.model.frontend.requires_grad_(False)
        # A post-processing CRF may evaluate a checkpoint trained with or without a CRF-RNN.
        self.strict_loading = crf != "dense"
        self.val_confusion = ConfusionMatrix(num_classes, IGNORE_INDEX)
        self.test_confusion = ConfusionMatrix(num_classes, IGNORE_INDEX)
        # Weighted by labelled pixels and summed over processes: the mean over every labelled
        # pixel, whatever the batches and the processes' shares.
        self.val_loss = MeanMetric()
        self.class_iou: dict[str, list[float]] = {}  # see log_iou
        # The checkpoint a run resumes or evaluates (the CLI sets it from --ckpt_path): its
        # weights are the starting ones, see load_initial_weights.
        self.checkpoint_path: str | None = None
        self.initial_weights_loaded = False
        self.compiled = False
        self.context_padding_checked = False  # see warn_padded_context

    # ---- weights ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.stage == "crf" and self.hparams.crf != "rnn":
            # (evaluating a crf-stage checkpoint without its CRF, or with a fixed one, is fine)
            raise RunError("stage 'crf' trains a CRF-RNN: set --model.crf=rnn")
        # Runs before Lightning restores a ckpt_path, so resuming still wins over init_from;
        # evaluating without a checkpoint evaluates init_from's weights.
        self.load_initial_weights(evaluating=stage != "fit")
        self.apply_fast_path(self.trainer.strategy.root_device)

    def check_context_margin(self, margin: int) -> None:
        """See :func:`~dilatedseg.models.frontend.check_context_margin` (the CLI checks the
        configured margin before anything runs; this checks each batch's)."""
        try:
            check_context_margin(margin, self.model.frontend.arch, self.model.frontend.padding)
        except ValueError as error:
            raise RunError(str(error)) from None

    def apply_fast_path(self, device: torch.device) -> None:
        """For a run on ``device``: channels_last weights on CUDA; torch.compile of the context
        module and CRF if asked (once); no NaN fill of fresh memory.

        ``trainer.deterministic`` (``warn`` in every recipe) also makes torch fill every new
        tensor from ``torch.empty`` with NaN, a debugging aid against reading uninitialised
        memory that costs a write of each activation; the deterministic algorithms stay on.
        """
        torch.utils.deterministic.fill_uninitialized_memory = False
        if device.type == "cuda" and self.hparams.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.hparams.compile and not self.compiled:
            for part in (self.model.context, self.model.crf):
                if part is not None:
                    part.compile()  # in place: parameter names and checkpoints unchanged
            self.compiled = True

    def load_initial_weights(self, evaluating: bool = False) -> None:
        """Load the starting weights once, before ``setup`` ends (the feature cache needs
        them): those of ``checkpoint_path`` when set (the CLI sets it to --ckpt_path, whose
        weights Lightning restores only after setup: resuming, or evaluating a checkpoint;
        init_from is not read then, it may be gone), else ``init_from``'s. ``evaluating``:
        for validate / test / predict, where weights must not be left untrained (see
        :meth:`load_weights`)."""
        if self.initial_weights_loaded:
            return
        source = self.checkpoint_path or self.hparams.init_from
        if source:
            self.load_weights(source, evaluating)
        self.initial_weights_loaded = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Weights restored from a checkpoint (load_from_checkpoint, or a trainer's ckpt_path)
        # are the ones to use: init_from must not overwrite them at a later setup.
        self.initial_weights_loaded = True
        if self.model.crf is None:  # a CRF-RNN checkpoint evaluated without its CRF
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.startswith("model.crf.")]:
                del state[key]
        else:
            self.expand_scalar_crf_optimizer_state(checkpoint)

    def expand_scalar_crf_optimizer_state(self, checkpoint: dict) -> None:
        """A CRF-RNN checkpoint from before its kernel weights became C x C holds scalar
        weights w (the CRF loads them as w * I) and, to resume, the optimiser's scalar state
        of them (momentum, Adam's averages): expanded the same way, times I."""
        crf, state = self.model.crf, checkpoint.get("state_dict", {})
        if not crf.trainable:
            return
        params = [p for group in self.parameter_groups() for p in group["params"]]
        eye = torch.eye(crf.num_classes)
        for name in ("spatial_weight", "bilateral_weight"):
            saved = state.get(f"model.crf.{name}")
            if not torch.is_tensor(saved) or saved.dim() != 0:
                continue  # already C x C
            # The optimiser's state is keyed by the parameter's place in the groups.
            index = next((i for i, p in enumerate(params) if p is getattr(crf, name)), None)
            for optimizer in checkpoint.get("optimizer_states", []):
                values = optimizer.get("state", {}).get(index, {})
                for key, value in values.items():
                    if key != "step" and torch.is_tensor(value) and value.dim() == 0:
                        values[key] = value * eye.to(value)

    def load_weights(self, path: str, evaluating: bool = False) -> None:
        """Copy matching weights from a checkpoint of any stage (weights only, no state), or
        from one of the authors' published .caffemodel files. A context module the checkpoint
        does not fill keeps its initialisation when training (with a warning); when
        ``evaluating`` it is an error: the scores would be an untrained module's."""
        if not Path(path).is_file():
            raise RunError(f"init_from checkpoint {path} does not exist: pass the path of an "
                           "earlier stage's .ckpt, or init_from: auto to find it under runs/")
        if str(path).endswith(".caffemodel"):
            self.load_caffemodel(path)
            return
        checkpoint = read_checkpoint(path)
        hparams = checkpoint.get("hyper_parameters", {})
        check_frontend(path, hparams, self.hparams.arch, self.hparams.padding)
        source = checkpoint.get("state_dict", checkpoint)
        if self.model.crf is not None:  # before the shapes are compared
            self.model.crf.upgrade_state_dict(source, "model.crf.")
        own = self.state_dict()
        matched = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
        missing_frontend = [k for k in own if k.startswith("model.frontend.") and k not in matched]
        if missing_frontend:
            raise RunError(
                f"{path} does not fit this model: front-end weights {missing_frontend[:3]} are "
                "missing or differ in shape (same arch and num_classes?)")
        unfit = self.context_misfit(source, hparams)
        if evaluating and self.model.context is not None and (unfit or not any(
                key.startswith("model.context.") for key in matched)):
            raise RunError(
                f"{path} holds no weights that fit this model's context module "
                f"({unfit or 'the checkpoint has none'}), so the scores would be those of an "
                f"untrained one: evaluate the checkpoint as it was trained with "
                f"--ckpt_path={path} (its saved options rebuild its model), or pass the "
                "options it was trained with")
        if unfit:
            rank_zero_warn(f"{path}: its context module does not fit this one ({unfit}): only "
                           "the front-end is loaded, the context module keeps its "
                           "initialisation")
            matched = {k: v for k, v in matched.items() if not k.startswith("model.context.")}
        self.load_state_dict(matched, strict=False)

    def context_misfit(self, source: dict, hparams: dict) -> str | None:
        """Why a checkpoint's context module cannot stand in for this one (None: it can, or
        either has none): another variant, schedule or padding, or other layers or shapes.
        Taken whole or not at all: a schedule of the same depth has the same shapes."""
        own = {k: v for k, v in self.state_dict().items() if k.startswith("model.context.")}
        theirs = {k: v for k, v in source.items() if k.startswith("model.context.")}
        if not own or not theirs:
            return None
        for name, resolve in (("context_variant", str), ("dilations", resolve_dilations),
                              ("context_padding", str)):
            if hparams.get(name) is not None and \
                    resolve(hparams[name]) != resolve(self.hparams[name]):
                return f"{name} {resolve(hparams[name])} vs {resolve(self.hparams[name])}"
        for key in sorted(own.keys() | theirs.keys()):
            if key not in own or key not in theirs or own[key].shape != theirs[key].shape:
                shape = {k: tuple(d[key].shape) if key in d else "none"
                         for k, d in (("theirs", theirs), ("ours", own))}
                return (f"{key}: {shape['theirs']} vs {shape['ours']}; another "
                        "context_variant or dilations?")
        return None

    def load_caffemodel(self, path: str) -> None:
        """The authors' published weights, which take mean-subtracted 0-255 input unscaled."""
        try:
            check_caffe_input(path, self.model.pixel_std.flatten().tolist())
            load_caffemodel(self.model, path)
        except WeightsError as error:
            raise RunError(str(error)) from None

    # ---- steps ------------------------------------------------------------------------------
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    def configure_callbacks(self) -> list:
        if not self.hparams.feature_cache:
            return []
        from dilatedseg.features import FrontendLogitsCache

        return [FrontendLogitsCache(self.hparams.feature_cache_dir)]

    def batch_logits(self, batch: dict, use_crf: bool = True) -> torch.Tensor:
        """Full-resolution logits of a batch of images, or of cached ``frontend_logits``."""
        if "frontend_logits" in batch:
            return self.cached_batch_logits(batch, use_crf)
        return self.image_logits(batch["image"])

    def image_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits of images, whole or in the configured tiles."""
        return predict_logits(self.model, image, self.hparams.tile_size,
                              self.hparams.tile_whole_network)

    def cached_batch_logits(self, batch: dict, use_crf: bool) -> torch.Tensor:
        """Cached logits padded to one size: each size's items run at their own size (the
        context module and the upsampling never see the padding), the rest stays 0 (its
        labels are 255)."""
        logits, size = batch["frontend_logits"], batch["label"].shape[-2:]
        sizes = batch.get("logits_size")  # (only in splits of several sizes)
        if sizes is None or bool((sizes == sizes.new_tensor(logits.shape[-2:])).all()):
            return self.model.from_frontend_logits(logits, size, use_crf=use_crf)  # unpadded
        out = None
        for h, w in sorted({tuple(s.tolist()) for s in sizes}):
            items = (sizes == sizes.new_tensor([h, w])).all(1).nonzero().flatten()
            part = self.model.from_frontend_logits(
                logits[items, :, :h, :w], (min(size[0], OUTPUT_STRIDE * h),
                                           min(size[1], OUTPUT_STRIDE * w)), use_crf=use_crf)
            if out is None:
                out = part.new_zeros((len(logits), part.shape[1], *size))
            out[items, :, :part.shape[-2], :part.shape[-1]] = part
        return out

    def on_train_epoch_start(self) -> None:
        if self.hparams.stage == "context":
            self.model.frontend.eval()  # frozen: no dropout, fixed outputs

    # A class map grows this many times in area under padding="valid" before the context
    # module warns: the published VOC model (Dilation8, margin 33) grows a 63 x 47 map ~5x.
    MAX_PADDED_CONTEXT_GROWTH = 8

    def warn_padded_context(self, label_size: tuple[int, int]) -> None:
        """Once per run: with ``context_padding="valid"`` the context module pads each class map
        by the schedule's sum of dilations on every side, so a long schedule (a sweep's) on
        small maps multiplies its activations' memory (Dilation10 on VOC: ~33x, tens of GB at
        the recipe's batch) with no other sign until the device runs out."""
        context = self.model.context
        if self.context_padding_checked or context is None or not context.margin:
            return
        self.context_padding_checked = True
        h, w = (-(-size // OUTPUT_STRIDE) for size in label_size)
        growth = (h + 2 * context.margin) * (w + 2 * context.margin) / (h * w)
        if growth > self.MAX_PADDED_CONTEXT_GROWTH:
            rank_zero_warn(
                f"context_padding=valid pads each {h}x{w} class map by {context.margin} (the sum "
                f"of the dilations {list(context.dilations)}) to {h + 2 * context.margin}x"
                f"{w + 2 * context.margin}: the context module's activations take {growth:.0f}x "
                "their unpadded memory. For long schedules, --model.context_padding=same pads "
                "each layer instead (the urban models' geometry).")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        use_crf = self.hparams.crf == "rnn"  # a fixed (post-processing) CRF takes no part
        if "frontend_logits" in batch:
            logits = self.batch_logits(batch, use_crf=use_crf)
        else:
            image, label = batch["image"], batch["label"]
            margin = (image.shape[-1] - label.shape[-1]) // 2  # context around the labels
            self.check_context_margin(margin)
            logits = self.model(image, use_crf=use_crf, context_included=margin > 0)
        self.warn_padded_context(batch["label"].shape[-2:])
        loss = segmentation_loss(logits, batch["label"])
        # Not in the progress bar: showing it reads the value back every step (a host-device
        # sync); the loggers read it every log_every_n_steps.
        self.log("train/loss", loss, batch_size=len(logits))
        return loss

    def evaluate(self, batch: dict, confusion: ConfusionMatrix
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's logits and predicted label maps, counted in ``confusion``."""
        logits = self.batch_logits(batch)
        prediction = argmax_classes(logits)
        confusion.update(prediction, batch["label"])
        return logits, prediction

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        """The batch's predicted label maps go to the callbacks (W&B images) as ``outputs``."""
        logits, prediction = self.evaluate(batch, self.val_confusion)
        labelled = (batch["label"] != IGNORE_INDEX).sum()  # the batch's mean is over these
        self.val_loss.update(segmentation_loss(logits, batch["label"]), weight=labelled)
        self.log("val/loss", self.val_loss, batch_size=len(logits))
        return {"prediction": prediction}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate(batch, self.test_confusion)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self.image_logits(batch["image"])
        return {"name": batch["name"], "prediction": argmax_classes(logits).to(torch.uint8)}

    def log_iou(self, prefix: str, confusion: ConfusionMatrix) -> None:
        matrix = confusion.compute()  # summed over processes under DDP
        # Every process holds these same values (from the summed matrix): the MAX "sync" keeps
        # them exactly and tells Lightning they are synced (it warns on unsynced epoch values).
        log = functools.partial(self.log, sync_dist=True, reduce_fx="max")
        log(f"{prefix}/mIoU", mean_iou(matrix).float() * 100, prog_bar=True)
        ious = iou_from_confusion(matrix).tolist()
        # This evaluation's IoU per class in % (NaN: absent), e.g. for the W&B table; the
        # trainer's callback_metrics would still hold an earlier epoch's value for a class
        # absent from this one.
        self.class_iou[prefix] = [iou * 100 for iou in ious]
        for name, iou in zip(self.class_names, ious):
            if iou == iou:  # skip classes absent from ground truth and prediction
                log(f"{prefix}/IoU/{name}", iou * 100)
        if self.hparams.categories:
            scores = category_iou(matrix, list(self.hparams.categories))
            present = [iou for iou in scores.values() if iou == iou]
            if present:
                log(f"{prefix}/mIoU_category", sum(present) / len(present) * 100)
            for name, iou in scores.items():
                if iou == iou:
                    log(f"{prefix}/catIoU/{name}", iou * 100)
        confusion.reset()

    def on_validation_epoch_end(self) -> None:
        self.log_iou("val", self.val_confusion)

    def on_test_epoch_end(self) -> None:
        self.log_iou("test", self.test_confusion)

    # ---- optimisation -----------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """Weights with weight decay; biases at bias_lr_mult x lr without it (Caffe)."""
        weights, biases = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (biases if name.endswith("bias") else weights).append(param)
        hp = self.hparams
        return [
            {"params": weights, "lr": hp.lr, "weight_decay": hp.weight_decay},
            {"params": biases, "lr": hp.lr * hp.bias_lr_mult, "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        hp = self.hparams
        groups = self.parameter_groups()
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        else:
            optimizer = torch.optim.Adam(groups, lr=hp.lr)
        if hp.lr_schedule == "constant":
            return optimizer
        if hp.lr_schedule == "step" and hp.lr_step_iters:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, hp.lr_step_iters, hp.lr_gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                             "interval": "step"}}
        if hp.lr_schedule == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, hp.lr_step_epochs, hp.lr_gamma)
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        total: list[int] = []

        def poly(step: int) -> float:
            # The run's length is read at the first step, not now: asking for it here makes
            # Lightning start the training loader's workers before on_fit_start, where the
            # feature cache attaches its datasets (persistent workers would keep stale copies).
            if step == 0:
                return 1.0
            if not total:
                total.append(max(1, int(self.trainer.estimated_stepping_batches)))
            return max(0.0, 1 - step / total[0]) ** 0.9

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
