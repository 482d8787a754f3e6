"""Cached front-end logits: same training as uncached, invalidation, mirroring, CLI location."""

import json
import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, shapes_args

from dilatedseg.data import ShapesDataModule
from dilatedseg.features import CachedLogitsDataset, build_cache, cache_key
from dilatedseg.models import FrontEnd, Segmenter
from dilatedseg.module import SegmentationModule


class Losses(L.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(outputs["loss"].item())
        self.cached = "frontend_logits" in batch


SMALL = {"train_size": 16, "val_size": 4, "test_size": 4}


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory):
    """16 train / 4 val shapes images: the cache build runs the front-end over all of them."""
    root = tmp_path_factory.mktemp("small_shapes")
    ShapesDataModule(root=str(root), **SMALL).prepare_data()
    return root


def context_epoch(root, tmp_path, feature_cache: bool, **data_args):
    L.seed_everything(0)
    data = ShapesDataModule(root=str(root), **SMALL, batch_size=4, val_batch_size=4,
                            num_workers=0, mirror=False, **data_args)
    module = SegmentationModule(4, stage="context", arch="tiny", padding="same", dropout=0.0,
                                dilations=[1, 1, 2, 4, 8, 1], optimizer="sgd", lr=0.01,
                                feature_cache=feature_cache,
                                feature_cache_dir=str(tmp_path / "cache"))
    with torch.no_grad():  # a front-end with confident, image-dependent logits
        module.model.frontend.final.weight.normal_(0, 0.5)
    losses = Losses()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[losses], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    return losses, trainer.callback_metrics, module


def test_cached_epoch_equals_uncached(small_shapes, tmp_path):
    plain, plain_metrics, plain_module = context_epoch(small_shapes, tmp_path, False)
    cached, cached_metrics, cached_module = context_epoch(small_shapes, tmp_path, True)
    assert cached.cached and not plain.cached
    assert len(cached.values) == len(plain.values) == 4  # 16 images / batch 4
    torch.testing.assert_close(cached.values, plain.values, rtol=1e-4, atol=1e-5)
    assert abs(cached_metrics["val/mIoU"] - plain_metrics["val/mIoU"]) < 1e-3
    torch.testing.assert_close(cached_module.model.context.state_dict(),
                               plain_module.model.context.state_dict(), rtol=1e-4, atol=1e-5)
    caches = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert caches == ["train", "val"]


def test_cache_holds_one_whole_image_per_item_with_crops_per_image(small_shapes, tmp_path):
    # (crops_per_image stacked several whole images into one item: the cache build crashed)
    losses, _, _ = context_epoch(small_shapes, tmp_path, True, crop_size=64, crops_per_image=2)
    assert losses.cached and len(losses.values) == 4  # 16 whole images / batch 4


def small_dataset(root):
    data = ShapesDataModule(root=str(root), train_size=32, val_size=8, test_size=8)
    data.prepare_data()
    return data.make_dataset("val")


def test_key_follows_weights_and_files(tiny_shapes, tmp_path):
    dataset = small_dataset(tiny_shapes)
    segmenter = Segmenter(FrontEnd(4, arch="tiny", padding="same"))
    key = cache_key(segmenter, dataset)
    assert cache_key(segmenter, dataset) == key
    with torch.no_grad():
        segmenter.frontend.final.bias[0] += 1
    assert cache_key(segmenter, dataset) != key
    key = cache_key(segmenter, dataset)
    label = dataset.pairs[3][1]
    stat = label.stat()
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    try:
        assert cache_key(segmenter, dataset) != key
    finally:
        os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_cached_items_mirror_and_pad(tiny_shapes, tmp_path):
    dataset = small_dataset(tiny_shapes)
    dataset.pairs = dataset.pairs[:4]
    segmenter = Segmenter(FrontEnd(4, arch="tiny", padding="valid"))
    directory = build_cache(tmp_path / "val-x", segmenter, dataset)
    assert not list(tmp_path.glob("*.partial-*"))
    cached = CachedLogitsDataset(directory=directory)
    item = cached[2]
    with torch.no_grad():
        expected = segmenter.eval().frontend_logits(dataset[2]["image"][None])[0]
    torch.testing.assert_close(item["frontend_logits"], expected)
    assert torch.equal(item["label"], dataset[2]["label"]) and item["label"].dtype == torch.uint8

    mirrored = CachedLogitsDataset(directory=directory, mirror=True)
    torch.manual_seed(0)
    flips = 0
    for _ in range(12):
        out = mirrored[2]
        flipped = torch.equal(out["label"], item["label"].flip(-1))
        assert flipped or torch.equal(out["label"], item["label"])
        reference = item["frontend_logits"].flip(-1) if flipped else item["frontend_logits"]
        assert torch.equal(out["frontend_logits"], reference)  # logits and label together
        flips += flipped
    assert 0 < flips < 12



class SampledFrontEnd(torch.nn.Module):
    """A 'perfect' front-end: logit j is the one-hot label at pixel 8j + 3, its centre."""

    def __init__(self):
        super().__init__()
        self.frontend = torch.nn.Identity()

    def frontend_logits(self, image):
        return F.one_hot(image[:, 0, 3::8, 3::8].long(), 2).permute(0, 3, 1, 2).float()


def test_mirrored_cached_logits_stay_aligned_with_their_labels(tmp_path):
    """Width 36 (not a multiple of 8): the mirrored label follows the mirrored logits, so the
    upsampled logits fit it exactly as well as unmirrored ones fit the original."""
    label = (torch.arange(36) >= 16).long().expand(16, 36)  # midway between centres
    images = [{"image": label.expand(3, 16, 36).float(), "label": label, "name": "a"}]
    directory = build_cache(tmp_path / "c", SampledFrontEnd(), images)
    segmenter = Segmenter(FrontEnd(2, arch="tiny", padding="same"))
    plain = CachedLogitsDataset(directory=directory)[0]["frontend_logits"]
    errors = {}
    torch.manual_seed(0)
    for _ in range(16):
        item = CachedLogitsDataset(directory=directory, mirror=True)[0]
        mirrored = not torch.equal(item["frontend_logits"], plain)
        logits = segmenter.from_frontend_logits(item["frontend_logits"][None],
                                                item["label"].shape)
        valid = item["label"] != 255
        errors[bool(mirrored)] = (logits[0].argmax(0) != item["label"])[valid].sum().item()
    assert errors == {False: 0, True: 0}


def test_images_of_different_sizes_are_padded(tmp_path):
    sizes = [(24, 40), (13, 32)]
    images = [{"image": torch.rand(3, h, w) * 255, "label": torch.randint(0, 4, (h, w)),
               "name": f"im{i}"} for i, (h, w) in enumerate(sizes)]
    segmenter = Segmenter(FrontEnd(4, arch="tiny", padding="same"))
    cached = CachedLogitsDataset(directory=build_cache(tmp_path / "c", segmenter, images))
    small = cached[1]
    assert small["frontend_logits"].shape == (4, 3, 5) and small["label"].shape == (24, 40)
    assert (small["frontend_logits"][:, 2:] == 0).all() and (small["label"][13:] == 255).all()
    assert torch.equal(small["label"][:13, :32], images[1]["label"])


def test_cli_context_stage_caches_under_runs(small_shapes, tmp_path):
    """As `make train` runs it: DataLoader workers, and the poly schedule, which makes
    Lightning start the training loader's (persistent) workers while configuring the optimiser,
    before on_fit_start: the cache must be attached by then."""
    runs = tmp_path / "runs"
    run_cli("fit", *shapes_args(small_shapes, runs, "--config", "conf/stage/context.yaml"),
            *[f"--data.init_args.{k}={v}" for k, v in SMALL.items()],
            "--model.init_from=null", "--trainer.max_epochs=1", "--model.lr_schedule=poly",
            "--data.init_args.num_workers=2")
    caches = sorted(p.name.split("-")[0] for p in (runs / "shapes" / "cache").iterdir())
    assert caches == ["train", "val"]
    summary = json.loads((runs / "shapes/context/version_0/summary.json").read_text())
    assert summary["epochs"] == 1 and [row["epoch"] for row in summary["history"]] == [0]
    assert summary["best_val_mIoU"] == pytest.approx(summary["history"][0]["val/mIoU"],
                                                     abs=1e-3)


@pytest.mark.parametrize("option, message", [
    (["--model.crf=dense"], "--model.crf=dense needs the images"),
    (["--model.tile_size=[64,64]", "--model.tile_whole_network=true"],
     "--model.tile_whole_network=true runs the network per image tile"),
], ids=["crf", "tile_whole_network"])
def test_cached_context_stage_that_needs_images_stops_before_training(
        small_shapes, tmp_path, capsys, option, message):
    """A CRF or per-tile evaluation needs images, which cached batches do not carry (the
    validation would silently score something else): one message with both ways out."""
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *shapes_args(small_shapes, runs, "--config", "conf/stage/context.yaml"),
                *[f"--data.init_args.{k}={v}" for k, v in SMALL.items()],
                "--model.init_from=null", *option)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "--model.feature_cache=false" in err
    assert not (runs / "shapes" / "cache").exists() and not list(runs.rglob("*.ckpt"))


def test_cached_training_step_leaves_a_dense_crf_out(tmp_path):
    """Training ignores a post-processing CRF, also on cached logits."""
    module = SegmentationModule(3, stage="context", arch="tiny", padding="same", crf="dense",
                                dilations=[1, 2])
    batch = {"frontend_logits": torch.randn(2, 3, 4, 4), "label": torch.randint(0, 3, (2, 32, 32))}
    module.log = lambda *args, **kwargs: None
    assert module.training_step(batch, 0).isfinite()


def test_a_run_limited_to_a_few_batches_caches_only_what_it_reads(small_shapes, tmp_path):
    """A debug run (limit_*_batches, fast_dev_run) must not compute the whole split's logits."""


    runs = tmp_path / "runs"
    run_cli("fit", *shapes_args(small_shapes, runs, "--config", "conf/stage/context.yaml"),
            *[f"--data.init_args.{k}={v}" for k, v in SMALL.items()],
            "--data.init_args.val_batch_size=2", "--model.init_from=null",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1")
    sizes = {p.name.split("-")[0]: len(json.loads((p / "index.json").read_text())["items"])
             for p in (runs / "shapes" / "cache").iterdir()}
    assert sizes == {"train": 8, "val": 2}  # one batch each of 16 / 4 images


def test_training_without_validation_caches_only_the_training_split(small_shapes, tmp_path):
    """limit_val_batches=0 reads no validation item: nothing to cache for it (this crashed on
    an empty cache before), and training runs on the cached training logits."""
    data = ShapesDataModule(root=str(small_shapes), **SMALL, batch_size=4, num_workers=0)
    module = SegmentationModule(4, stage="context", arch="tiny", padding="same",
                                dilations=[1, 2], feature_cache=True,
                                feature_cache_dir=str(tmp_path / "cache"))
    losses = Losses()
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, callbacks=[losses],
              default_root_dir=tmp_path).fit(module, datamodule=data)
    assert losses.cached and len(losses.values) == 4
    assert [p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()] == ["train"]


def test_resuming_from_python_reuses_the_cache_of_the_restored_front_end(small_shapes,
                                                                          tmp_path):
    """trainer.fit(ckpt_path=...) with a fresh module: the cache is looked up with the
    checkpoint's (restored) front-end, not the fresh module's random one."""
    data = ShapesDataModule(root=str(small_shapes), **SMALL, batch_size=4, val_batch_size=4,
                            num_workers=0)

    def run(module, epochs, ckpt_path=None):
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt",
                                                         save_last=True)
        L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0,
                  callbacks=[checkpoint], default_root_dir=tmp_path
                  ).fit(module, datamodule=data, ckpt_path=ckpt_path)

    def fresh(seed):
        torch.manual_seed(seed)
        return SegmentationModule(4, stage="context", arch="tiny", padding="same",
                                  dilations=[1, 2], feature_cache=True,
                                  feature_cache_dir=str(tmp_path / "cache"))

    run(fresh(0), 1)
    caches = sorted(p.name for p in (tmp_path / "cache").iterdir())
    run(fresh(1), 2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == caches


@pytest.mark.parametrize("context_padding", ["same", "valid"])
def test_cached_images_of_different_sizes_train_as_one_at_a_time(tmp_path, context_padding):
    """Padded to one size so they batch, each image still gets exactly its own logits: the
    padding reaches neither the context module nor the upsampling."""
    from torch.utils.data import default_collate

    torch.manual_seed(0)
    sizes = [(24, 40), (13, 30)]
    images = [{"image": torch.rand(3, h, w) * 255, "label": torch.randint(0, 4, (h, w)),
               "name": f"im{i}"} for i, (h, w) in enumerate(sizes)]
    module = SegmentationModule(4, stage="context", arch="tiny", padding="same",
                                dilations=[1, 2, 1], context_padding=context_padding)
    for conv in module.model.context.convs():  # far from identity, so padding would show
        torch.nn.init.normal_(conv.weight, std=0.3)
    module.model.eval()
    cached = CachedLogitsDataset(directory=build_cache(tmp_path / "c", module.model, images))
    with torch.no_grad():
        alone = [module.model(item["image"][None])[0] for item in images]
        for indices in ([0, 1], [1, 1]):  # two sizes; one size, padded to the split's largest
            batch = default_collate([cached[i] for i in indices])
            together = module.batch_logits(batch)
            assert together.shape[-2:] == batch["label"].shape[-2:]
            for row, i in enumerate(indices):
                h, w = sizes[i]
                torch.testing.assert_close(together[row, :, :h, :w], alone[i])
