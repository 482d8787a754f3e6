"""Metrics: mIoU conventions, category IoU, and equality with the official Cityscapes scripts."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dilatedseg.data.cityscapes import CATEGORIES, LABELS, label_id_lookup, train_id_lookup
from dilatedseg.metrics import (
    ConfusionMatrix,
    argmax_classes,
    category_confusion,
    category_iou,
    iou_from_confusion,
    mean_iou,
)

REALDATA = Path("/work/shared/realdata/cityscapes/gtFine/val/frankfurt")


def test_argmax_classes_equals_argmax_with_ties_and_nan():
    """The faster max(1).indices picks argmax's class: the first maximal one, NaN maximal."""
    for classes in (2, 4, 21):
        scores = torch.randint(0, 3, (3, classes, 17, 19)).float()  # many ties
        scores[0, 1, 0, 0] = float("nan")
        scores[1, :, 2, 2] = float("nan")
        scores[2, classes - 1, 5, 5] = float("inf")
        for layout in (torch.contiguous_format, torch.channels_last):
            scores = scores.contiguous(memory_format=layout)
            assert torch.equal(argmax_classes(scores), scores.argmax(1))


def test_mean_iou_leaves_out_classes_absent_from_prediction_and_ground_truth():
    confusion = ConfusionMatrix(4)
    target = torch.tensor([[0, 0, 1, 255]])
    preds = torch.tensor([[0, 1, 1, 3]])
    confusion.update(preds, target)
    iou = iou_from_confusion(confusion.compute())
    assert iou[:2].tolist() == [0.5, 0.5]
    assert torch.isnan(iou[2])  # class 2: nowhere; class 3 predicted only on an ignored pixel
    assert torch.isnan(iou[3])
    assert mean_iou(confusion.compute()).item() == pytest.approx(0.5)


def test_confusion_matrix_takes_uint8_labels_and_refuses_invalid_values():
    preds = torch.tensor([[0, 1, 2, 2, 1]])
    target = torch.tensor([[0, 1, 2, 255, 2]])
    for dtype in (torch.uint8, torch.int64):
        confusion = ConfusionMatrix(3)
        confusion.update(preds, target.to(dtype))
        assert confusion.compute().tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    confusion.update(preds, torch.tensor([[0, 7, 9, 255, 1]]))  # two pixels of no class
    with pytest.raises(ValueError, match="2 target pixels hold label values outside"):
        confusion.compute()


def test_an_ignore_index_among_the_classes_is_still_ignored():
    confusion = ConfusionMatrix(3, ignore_index=0)
    confusion.update(torch.tensor([[1, 1, 2]]), torch.tensor([[0, 1, 2]]))
    assert confusion.compute().tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_category_confusion_sums_blocks():
    matrix = torch.arange(9).view(3, 3)
    grouped = category_confusion(matrix, [0, 0, 1], 2)
    assert grouped.tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]
    scores = category_iou(matrix, ["a", "a", "b"])
    assert list(scores) == ["a", "b"] and scores["b"] == pytest.approx(8 / (13 + 7 + 8))


def official_evaluation(predictions: list[Path], ground_truth: list[Path], monkeypatch) -> dict:
    """cityscapesscripts' pixel-level evaluation on label-id PNGs (class and category IoU)."""
    monkeypatch.setenv("CITYSCAPES_DATASET", str(ground_truth[0].parent))
    if not hasattr(np, "in1d"):  # removed in numpy 2.4; only the instance path uses it
        monkeypatch.setattr(np, "in1d", np.isin, raising=False)
    module = importlib.import_module("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    args = module.args
    monkeypatch.setattr(args, "evalInstLevelScore", False)
    monkeypatch.setattr(args, "evalPixelAccuracy", False)
    monkeypatch.setattr(args, "JSONOutput", False)
    monkeypatch.setattr(args, "quiet", True)
    return module.evaluateImgLists([str(p) for p in predictions],
                                   [str(p) for p in ground_truth], args)


def test_class_and_category_iou_equal_the_official_cityscapes_evaluation(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    ids = np.array([label_id for label_id, *_ in LABELS], np.uint8)
    ground_truth = [rng.choice(ids, size=(40, 60)) for _ in range(3)]
    ground_truth[1][:] = rng.choice([7, 8, 26, 0], size=(40, 60))  # few classes in one image
    if REALDATA.is_dir():
        ground_truth.append(np.asarray(
            Image.open(REALDATA / "frankfurt_000000_000294_gtFine_labelIds.png")))
    to_train, to_label = train_id_lookup(), label_id_lookup()
    confusion = ConfusionMatrix(19)
    gt_paths, pred_paths = [], []
    for i, gt in enumerate(ground_truth):
        train = to_train[gt]
        # Predictions: mostly right, some noise, and class 16 (train) never predicted.
        pred = np.where(rng.random(gt.shape) < 0.6, train, rng.integers(0, 19, gt.shape))
        pred[(pred == 255) | (pred == 16)] = 0
        confusion.update(torch.from_numpy(pred.astype(np.int64))[None],
                         torch.from_numpy(train.astype(np.int64))[None])
        gt_paths.append(tmp_path / f"city_{i:06d}_000019_gtFine_labelIds.png")
        pred_paths.append(tmp_path / f"pred_city_{i:06d}_000019.png")
        Image.fromarray(gt).save(gt_paths[-1])
        Image.fromarray(to_label[pred.astype(np.uint8)]).save(pred_paths[-1])
    official = official_evaluation(pred_paths, gt_paths, monkeypatch)

    matrix = confusion.compute()
    ours = iou_from_confusion(matrix).tolist()
    names = [name for _, name, train_id, _ in sorted(LABELS, key=lambda x: x[2]) if train_id != 255]
    for name, value in zip(names, ours):
        reference = official["classScores"][name]
        assert (np.isnan(value) and np.isnan(reference)) or value == pytest.approx(reference,
                                                                                   abs=1e-6)
    assert mean_iou(matrix).item() == pytest.approx(official["averageScoreClasses"], abs=1e-6)
    scores = category_iou(matrix, list(CATEGORIES))
    for name, value in scores.items():
        assert value == pytest.approx(official["categoryScores"][name], abs=1e-6)
    present = [v for v in scores.values() if v == v]
    assert sum(present) / len(present) == pytest.approx(official["averageScoreCategories"],
                                                        abs=1e-6)


def test_epoch_end_logs_percent_iou_per_present_class_and_category():
    """log_iou: mIoU, IoU per class and category IoU in %, classes absent from ground truth and
    prediction left out, and the matrix reset for the next epoch. Worked by hand:
    confusion (rows truth) [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]."""
    from dilatedseg.module import SegmentationModule

    module = SegmentationModule(4, ["a", "b", "c", "d"], arch="tiny", padding="same",
                                categories=["x", "x", "y", "y"])
    logged = {}
    module.log = lambda name, value, **kwargs: logged.update({name: float(value)})
    target = torch.tensor([[0, 0, 1, 1, 2, 255]])
    module.test_confusion.update(torch.tensor([[0, 1, 1, 1, 0, 3]]), target)
    module.on_test_epoch_end()
    expected = {"test/mIoU": 100 / 3, "test/IoU/a": 100 / 3, "test/IoU/b": 200 / 3,
                "test/IoU/c": 0.0,  # class d: predicted on an ignored pixel only
                # categories x = {a, b}, y = {c, d}: [[4, 0], [1, 0]]
                "test/mIoU_category": 40.0, "test/catIoU/x": 80.0, "test/catIoU/y": 0.0}
    assert logged == pytest.approx(expected)
    assert module.class_iou["test"][:3] == pytest.approx([100 / 3, 200 / 3, 0.0])
    assert np.isnan(module.class_iou["test"][3])
    assert module.test_confusion.compute().sum() == 0  # reset: the next epoch starts afresh
