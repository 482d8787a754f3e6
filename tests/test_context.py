"""Context module (paper Table 1, eqs. 4-5), published schedules and the Segmenter's upsampling."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dilatedseg.models import SCHEDULES, ContextModule, FrontEnd, Segmenter
from dilatedseg.models.context import count_weights, receptive_field, resolve_dilations
from dilatedseg.module import SegmentationModule


def test_basic_dilation8_has_64_c_squared_weights():
    for c in (4, 21):
        assert count_weights(ContextModule(c, dilations="dilation8")) == 64 * c * c


def measured_field(dilations, size: int) -> int:
    """Width of the input region one centre output depends on, measured by gradients."""
    net = ContextModule(2, dilations=dilations, padding="same")
    with torch.no_grad():
        for conv in net.convs():
            conv.weight.fill_(0.1)  # all positive: no ReLU blocks a path
    x = torch.ones(1, 2, size, size, requires_grad=True)
    net(x)[0, 0, size // 2, size // 2].backward()
    cols = torch.nonzero(x.grad[0].sum((0, 1))).flatten()
    rows = torch.nonzero(x.grad[0].sum((0, 2))).flatten()
    assert rows.max() - rows.min() == cols.max() - cols.min()
    return (cols.max() - cols.min() + 1).item()


@pytest.mark.parametrize("name,field,size", [("dilation7", 35, 45), ("dilation8", 67, 81),
                                             ("dilation10", 259, 271)])
def test_receptive_fields_of_published_schedules(name, field, size):
    assert receptive_field(SCHEDULES[name]) == field  # 1 + 2 * sum(dilations)
    assert measured_field(name, size) == field


@pytest.mark.parametrize("variant", ["basic", "large"])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_identity_init_reproduces_nonnegative_input(variant, padding):
    torch.manual_seed(0)
    x = torch.rand(2, 6, 40, 40) * 5
    exact = ContextModule(6, variant, "dilation8", padding=padding, noise_std=0.0)
    with torch.no_grad():
        torch.testing.assert_close(exact(x), x, rtol=1e-5, atol=1e-5)
        errors = [((ContextModule(6, variant, "dilation8", padding=padding, noise_std=std)(x)
                    - x).abs().mean() / x.mean()).item() for std in (0.01, 0.001)]
    # What remains is the N(0, sigma^2) noise of the 8 layers: it shrinks with sigma.
    assert errors[0] < 0.3 and errors[1] < 0.03, errors
    assert F.relu(-x).sum() == 0


def test_large_channel_plan_and_eq5():
    c = 5
    net = ContextModule(c, variant="large", dilations="dilation8")
    widths = [conv.out_channels for conv in net.convs()]
    assert widths == [2 * c, 2 * c, 4 * c, 8 * c, 16 * c, 32 * c, 32 * c, c]
    third = net.convs()[2]  # 2C -> 4C: centre tap C / 4C where floor(aC/2C) == floor(bC/4C)
    centre = third.weight.detach()[:, :, 1, 1]
    for b in range(4 * c):
        for a in range(2 * c):
            if a // 2 == b // 4:
                assert centre[b, a] == pytest.approx(0.25)
            else:
                assert abs(centre[b, a]) < 0.01
    assert third.weight[:, :, 0, 0].std() < 0.01 * 0.25 * 1.5  # sigma << C / c_out


def test_random_init_is_not_identity_and_bad_names_fail():
    torch.manual_seed(0)
    x = torch.rand(1, 4, 24, 24)
    with torch.no_grad():
        out = ContextModule(4, init="random")(x)
    assert (out - x).abs().mean() > 0.1
    with pytest.raises(ValueError, match="dilation schedule"):
        ContextModule(4, dilations="dilation9")
    with pytest.raises(ValueError, match="positive"):
        ContextModule(4, dilations=[1, 0, 2])
    with pytest.raises(ValueError, match="variant"):
        ContextModule(4, variant="huge")


def test_schedule_presets_and_lists():
    assert resolve_dilations("Dilation10") == (1, 1, 2, 4, 8, 16, 32, 64, 1)
    assert resolve_dilations([1, 1, 2, 4, 8, 1]) == SCHEDULES["dilation7"]


def test_upsample_auto_uses_frozen_deconv_for_dilation10():
    frontend = FrontEnd(3, arch="tiny", padding="same")
    d10 = Segmenter(frontend, ContextModule(3, dilations="dilation10"), upsample="auto")
    d8 = Segmenter(frontend, ContextModule(3, dilations=[1, 1, 2, 4, 8, 16, 1]), upsample="auto")
    assert d10.upsample == "deconv" and d8.upsample == "bilinear"
    assert "deconv_weight" not in d10.state_dict()  # a constant, not a learned weight
    assert not any("deconv" in name for name, _ in d10.named_parameters())
    # The bilinear deconvolution equals align_corners=False interpolation away from borders.
    coarse = torch.randn(1, 3, 10, 12)
    deconv = d10.upsample_to(coarse, (80, 96))
    bilinear = d8.upsample_to(coarse, (80, 96))
    assert deconv.shape == bilinear.shape == (1, 3, 80, 96)
    torch.testing.assert_close(deconv[..., 8:-8, 8:-8], bilinear[..., 8:-8, 8:-8])


@pytest.mark.parametrize("dilations", ["dilation10", [1, 1, 2, 4, 8, 1]])
def test_module_accepts_presets_and_lists(dilations):
    module = SegmentationModule(3, stage="context", arch="tiny", padding="same",
                                dilations=dilations)
    expected = resolve_dilations(dilations)
    assert module.model.context.dilations == expected
    assert module.model.upsample == ("deconv" if dilations == "dilation10" else "bilinear")


def test_optimiser_groups_follow_caffe():
    module = SegmentationModule(3, stage="context", arch="tiny", padding="same",
                                lr_schedule="step", lr_step_iters=5, lr_gamma=0.1)
    weights, biases = module.parameter_groups()
    assert biases["lr"] == 2 * weights["lr"] and biases["weight_decay"] == 0.0
    assert weights["weight_decay"] == 5e-4
    n_context = sum(1 for _ in module.model.context.parameters())
    assert len(weights["params"]) + len(biases["params"]) == n_context  # front-end frozen
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]
    assert optimizer.defaults["momentum"] == 0.9 and scheduler["interval"] == "step"
    for _ in range(5):
        optimizer.step()
        scheduler["scheduler"].step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert isinstance(module.model.context.layers[-1], nn.Conv2d)  # no ReLU at the end


def test_epoch_step_and_constant_schedules_and_adam():
    """step without lr_step_iters: x lr_gamma every lr_step_epochs epochs (Lightning's default
    epoch interval); constant: no scheduler at all; adam keeps the Caffe parameter groups."""
    def configured(**kwargs):
        module = SegmentationModule(3, stage="context", arch="tiny", padding="same", lr=0.01,
                                    **kwargs)
        return module.configure_optimizers()

    config = configured(lr_schedule="step", lr_step_epochs=3, lr_gamma=0.5)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)  # stepped once per epoch
    rates = []
    for _ in range(7):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.01] * 3 + [0.005] * 3 + [0.0025])
    assert optimizer.param_groups[1]["lr"] == pytest.approx(2 * 0.0025)  # biases: 2x
    constant = configured(lr_schedule="constant")
    assert isinstance(constant, torch.optim.SGD) and constant.defaults["momentum"] == 0.9
    adam = configured(optimizer="adam", lr_schedule="constant", weight_decay=1e-4)
    assert isinstance(adam, torch.optim.Adam)
    assert [(g["lr"], g["weight_decay"]) for g in adam.param_groups] == [(0.01, 1e-4),
                                                                         (0.02, 0.0)]
    with pytest.raises(ValueError, match="lr_schedule"):
        SegmentationModule(3, arch="tiny", lr_schedule="cosine")


def test_poly_schedule_reads_the_run_length_at_the_first_step():
    """(1 - step / total)^0.9 over the run; configuring it does not ask Lightning for the run
    length (that would start the training loader's workers before the feature cache is in)."""

    class Trainer:
        asked = 0

        @property
        def estimated_stepping_batches(self):
            Trainer.asked += 1
            return 10

    module = SegmentationModule(3, stage="context", arch="tiny", padding="same",
                                lr_schedule="poly", lr=0.01)
    module.trainer = Trainer()
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert Trainer.asked == 0 and optimizer.param_groups[0]["lr"] == 0.01
    for step in range(1, 6):
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - step / 10) ** 0.9)
    assert Trainer.asked == 1


def test_long_schedule_in_valid_padding_warns_of_its_memory(recwarn):
    """A VOC image (500 x 375: a 63 x 47 class map) under Dilation10 in valid geometry is padded
    by 129 on every side, 33x the map's area: warned once, with the padding that avoids it.
    The published VOC model (Dilation8, ~5x) and same padding are not warned about."""
    def warnings_for(dilations, padding, calls=1):
        module = SegmentationModule(21, stage="context", arch="tiny", padding="same",
                                    context_padding=padding, dilations=dilations)
        recwarn.clear()
        for _ in range(calls):
            module.warn_padded_context((500, 375))
        return [str(w.message) for w in recwarn if "context_padding" in str(w.message)]

    (message,) = warnings_for("dilation10", "valid", calls=2)
    assert "63x47 class map by 129" in message and "to 321x305" in message
    assert "33x their unpadded memory" in message and "--model.context_padding=same" in message
    assert warnings_for("dilation8", "valid") == []
    assert warnings_for("dilation10", "same") == []


def test_context_stage_trains_with_the_frozen_front_end_in_eval_mode(tiny_shapes):
    """No dropout in the frozen front-end (its logits are fixed), also after a validation in
    the middle of an epoch (which puts the module back in training mode); the context module
    trains; in the joint stage the front-end trains too."""
    import lightning as L

    from dilatedseg.data import ShapesDataModule

    def modes(stage: str) -> set[tuple[bool, bool]]:
        seen = set()

        class Modes(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                model = module.model
                seen.add((model.frontend.training, model.context.training))

        data = ShapesDataModule(root=str(tiny_shapes), train_size=32, val_size=8, test_size=8,
                                num_workers=0, batch_size=8, val_batch_size=8)
        module = SegmentationModule(4, stage=stage, arch="tiny", padding="same",
                                    dilations=[1, 2, 1])
        trainer = L.Trainer(max_epochs=1, val_check_interval=2, limit_val_batches=1,
                            num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[Modes()])
        trainer.fit(module, datamodule=data)
        return seen

    assert modes("context") == {(False, True)}
    assert modes("joint") == {(True, True)}
