"""The training loss: cross-entropy averaged over labelled pixels, never NaN."""

import torch
import torch.nn.functional as F

from dilatedseg.module import segmentation_loss


def test_loss_is_the_mean_over_labelled_pixels():
    logits = torch.randn(2, 5, 6, 7, dtype=torch.bfloat16)
    label = torch.randint(0, 5, (2, 6, 7))
    label[0, :3] = 255
    expected = F.cross_entropy(logits.float(), label, ignore_index=255)
    torch.testing.assert_close(segmentation_loss(logits, label), expected)
    assert segmentation_loss(logits, label).dtype == torch.float32


def test_a_batch_with_every_pixel_ignored_gives_zero_loss_and_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_validation_loss_is_the_mean_over_every_labelled_pixel_whatever_the_batches():
    """As one process or DDP shares batch them: equal to one cross-entropy over all pixels."""
    from dilatedseg.module import SegmentationModule

    torch.manual_seed(0)
    module = SegmentationModule(3, arch="tiny", padding="same").eval()
    module.log = lambda *args, **kwargs: None  # no trainer
    images = torch.rand(3, 3, 16, 16) * 255
    labels = torch.randint(0, 3, (3, 16, 16), dtype=torch.uint8)
    labels[0, :14] = 255  # one image mostly unlabelled
    with torch.no_grad():
        expected = F.cross_entropy(module.model(images), labels.long(), ignore_index=255)
        for batch in ([0, 2], [1]):  # not one process's grouping [0, 1], [2]
            module.validation_step({"image": images[batch], "label": labels[batch]}, 0)
    torch.testing.assert_close(module.val_loss.compute(), expected)
