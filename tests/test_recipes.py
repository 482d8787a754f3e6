"""The real datasets' training recipes as `make train STAGE=<stage> DATASET=<dataset>` resolves
them (conf/base.yaml, the dataset's config, the stage's, the dataset's stage overlay), against
the paper's (REFERENCE.md sec. 2-3; the VOC crop and joint batch from fyu/dilation's
docs/training.md), and the optimiser the resolved config builds."""

from __future__ import annotations

import functools
import re

import pytest
import torch
import yaml
from conftest import REPO
from test_cli import print_config
from test_published_models import module_from_config

from dilatedseg.cli import stage_configs

DATASETS = ("voc", "camvid", "kitti", "cityscapes")
STAGES = ("frontend", "context", "joint", "crf")

# What the paper states per dataset and stage: batch (images per optimiser step), base lr,
# momentum, iterations (optimiser steps) and the network's input crop (None: whole images).
PAPER = {
    ("voc", "frontend"): dict(batch=14, lr=1e-3, momentum=0.9, steps=60_000, crop=500),
    ("voc", "context"): dict(batch=60, lr=1e-3, momentum=0.9, crop=None),
    ("voc", "joint"): dict(batch=14, lr=1e-5, momentum=0.9, crop=500),
    ("camvid", "frontend"): dict(batch=8, lr=1e-4, momentum=0.99, steps=20_000, crop=628),
    ("kitti", "frontend"): dict(batch=8, lr=1e-4, momentum=0.99, steps=10_000, crop=628),
    ("cityscapes", "frontend"): dict(batch=8, lr=1e-4, momentum=0.99, steps=40_000, crop=628),
    ("cityscapes", "context"): dict(batch=100, lr=1e-4, momentum=0.99, steps=24_000, crop=None),
    ("cityscapes", "joint"): dict(batch=1, lr=1e-5, steps=60_000, crop=1396),
}
# The context module per dataset: schedule, variant, padding (REFERENCE sec. 2).
CONTEXT = {"voc": ("dilation8", "large", "valid"), "camvid": ("dilation8", "basic", "same"),
           "kitti": ("dilation7", "basic", "same"),
           "cityscapes": ("dilation10", "basic", "same")}
CAFFE_STEPSIZE = 100_000  # fyu/dilation train.py: lr x0.1 every 100K iterations


@functools.cache
def resolved(dataset: str, stage: str) -> dict:
    """The config `make train STAGE=<stage> DATASET=<dataset>` runs (`--print_config`)."""
    return yaml.safe_load(print_config(*stage_configs(REPO / "conf", dataset, stage)[1::2]))


def recipe(dataset: str, stage: str) -> dict:
    """The resolved recipe in the paper's terms."""
    config = resolved(dataset, stage)
    trainer, model, data = config["trainer"], config["model"], config["data"]["init_args"]
    whole = data["crop_size"] is None or model["feature_cache"]  # the cache holds whole images
    return dict(batch=data["batch_size"] * trainer["accumulate_grad_batches"], lr=model["lr"],
                momentum=model["momentum"], steps=trainer["max_steps"],
                crop=None if whole else data["crop_size"] + 2 * data["context_margin"])


@pytest.mark.parametrize(("dataset", "stage"), PAPER)
def test_recipe_is_the_papers(dataset, stage):
    ours = recipe(dataset, stage)
    assert {key: ours[key] for key in PAPER[dataset, stage]} == PAPER[dataset, stage]


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_stage_keeps_the_papers_common_settings(dataset):
    """SGD, weight decay 5e-4, biases 2x lr; a constant lr is Caffe's step policy over runs
    shorter than its step; crop, mirror and reflect padding, no scale jitter; the VGG-16
    front-end in the authors' geometry; the dataset's context module and upsampling."""
    for stage in STAGES:
        config = resolved(dataset, stage)
        model, data = config["model"], config["data"]["init_args"]
        assert (model["optimizer"], model["weight_decay"], model["bias_lr_mult"]) == \
            ("sgd", 5e-4, 2.0)
        assert model["lr_schedule"] == "constant"
        assert 0 < config["trainer"]["max_steps"] <= CAFFE_STEPSIZE
        assert data["mirror"] and data["scale_range"] is None and data["context_margin"] == 186
        assert (model["arch"], model["padding"], model["dropout"]) == ("vgg16", "valid", 0.5)
        assert (model["dilations"], model["context_variant"], model["context_padding"]) == \
            CONTEXT[dataset]
        assert model["context_init"] == "identity"
        assert model["upsample"] == ("deconv" if dataset == "cityscapes" else "bilinear")
        assert model["crf"] == ("rnn" if stage == "crf" else "none")


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("dataset", DATASETS)
def test_built_optimiser_gives_biases_twice_the_lr_and_no_decay(dataset, stage):
    """Caffe's lr_mult 2 / decay_mult 0 on biases, 1 / 1 on weights, in the optimiser the
    resolved config builds; frozen parameters (the context stage's front-end) are not in it,
    nor is the frozen upsampling deconvolution."""
    config = resolved(dataset, stage)
    module = module_from_config(config)
    optimizer = module.configure_optimizers()  # constant lr: no scheduler
    assert isinstance(optimizer, torch.optim.SGD)
    lr, momentum = config["model"]["lr"], config["model"]["momentum"]
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for name, param in module.model.named_parameters():
        frozen = stage == "context" and name.startswith("frontend.")
        assert param.requires_grad != frozen, name
        if frozen:
            assert id(param) not in groups, name
            continue
        group = groups[id(param)]
        bias = name.endswith(".bias")
        assert (group["lr"], group["weight_decay"], group["momentum"]) == \
            ((2 * lr, 0.0, momentum) if bias else (lr, 5e-4, momentum)), name
    assert len(groups) == sum(p.requires_grad for p in module.parameters())
    assert not any("deconv" in name for name, _ in module.model.named_parameters())


def readme_recipes() -> dict[tuple[str, str], dict]:
    """The recipe table of README.md's "Stages" section, in :func:`recipe`'s terms."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [cell.strip(" `") for cell in line.strip().strip("|").split("|")]
        if len(cells) < 7 or (cells[0], cells[1]) not in {(d, s) for d in DATASETS
                                                           for s in STAGES}:
            continue
        number = re.compile(r"[\d.e-]+")
        crop = None if cells[3].startswith("whole") else int(number.match(cells[3])[0])
        rows[cells[0], cells[1]] = dict(
            batch=int(number.match(cells[2])[0]), crop=crop, lr=float(cells[4]),
            momentum=float(cells[5]), steps=int(number.match(cells[6])[0]) * 1000)
    return rows


def test_readme_recipe_table_is_what_the_configs_resolve_to():
    rows = readme_recipes()
    assert set(PAPER) <= set(rows)
    for (dataset, stage), row in rows.items():
        assert row == recipe(dataset, stage), (dataset, stage)
