"""CPU smoke of every code path benchmarks/gpu_check.sh runs on a GPU, at tiny sizes: the rows
each section makes, the FLOPs their MFU is of (against dilatedseg.flops and PyTorch's own
counter), the JSON run.py writes, and the script's commands themselves."""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import re
import subprocess

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from dilatedseg.flops import context_macs, frontend_macs, head_macs, segmenter_macs
from dilatedseg.models.frontend import context_margin

CPU = torch.device("cpu")
PEAKS = {"bf16": 2.0, "fp32": 1.0}  # TFLOP/s: any value, to check the MFU arithmetic


@pytest.fixture(autouse=True)
def _benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as when run as a script


def bench(name: str):
    """A benchmarks/ module, imported as the scripts import each other."""
    return importlib.import_module(name)


def counted_flops(fn, *args, **kwargs):
    """(fn's result, the FLOPs of every convolution / matrix product it ran)."""
    with FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    return result, counter.get_total_flops()


def small(size: tuple[int, int]) -> tuple[int, int]:
    return size[0] // 32, size[1] // 32


def check_mfu(row, peak: float) -> None:
    assert row.tflops == pytest.approx(row.tflop / (row.ms / 1e3))
    assert row.mfu == pytest.approx(row.tflops / peak)
    assert row.throughput == pytest.approx(row.batch / (row.ms / 1e3))


def test_gpu_frontend_plan_runs_every_row_at_a_tiny_size(capsys):
    """Each GPU row of the frontend section, in order, made on the CPU with the tiny front-end
    at 1/32 of its size (bf16 rows under CPU autocast): its FLOPs are what flops.py counts for
    the shapes run and what the row really convolves, its MFU is of them; a failing call gives
    a row, and the next call still runs."""
    frontend = bench("frontend")
    plan = frontend.gpu_plan(PEAKS["bf16"], PEAKS["fp32"])
    target = plan[0].keywords  # the 40 % MFU target first, then the whole training step
    assert (plan[0].func, target["mode"], target["size"], target["batch"], target["precision"]) \
        == (frontend.frontend_row, "fwd+bwd", (512, 1024), 8, "bf16")
    assert plan[1].func is frontend.train_step_row and plan[1].keywords["size"] == (512, 1024)
    assert [call.func for call in plan[2:5]] == [frontend.segmenter_row] * 3
    assert len(plan) == 16

    bad = functools.partial(frontend.frontend_row, precision="fp32", mode="forward",
                            size=(32, 32), batch=1, peak=None, arch="vgg17")
    rows = frontend.measure_plan([bad], CPU, reps=1)
    assert rows[0].case.startswith("failed: frontend_row") and "vgg17" in rows[0].note

    for call in plan:
        keywords = call.keywords
        shrunk = {"arch": "tiny"}
        if "batch" in keywords:
            shrunk["batch"] = 2 if call.func is frontend.train_step_row else 1
        if call.func is frontend.segmenter_row:
            shrunk["size"] = small((1024, 2048))
            if keywords.get("tile", frontend.TILE) is not None:
                shrunk["tile"] = small(frontend.TILE)
        else:
            shrunk["size"] = small(keywords["size"])
        args = {**keywords, **shrunk}
        (row,), flops = counted_flops(frontend.measure_plan, [functools.partial(call, **shrunk)],
                                      CPU, reps=1)
        assert row.ms > 0 and row.batch == args.get("batch", 1) and row.runs == 1, row
        assert row.precision == args["precision"] and "tiny front-end" in row.case
        check_mfu(row, PEAKS[args["precision"]])
        size, batch = args["size"], row.batch
        count = frontend_macs("tiny", *size, "valid", frontend.CLASSES)
        if call.func is frontend.segmenter_row:
            macs = segmenter_macs("tiny", *size, frontend.CLASSES, tile=args.get("tile"))
            assert round(row.tflop * 1e12) == 2 * macs.total == flops
            assert ("whole" in row.case) == (args.get("tile") is None)
        elif call.func is frontend.train_step_row:
            assert round(row.tflop * 1e12) == 2 * batch * count.training()
            # what it runs besides: the frozen x8 deconvolution, forward and input gradient
            deconv = head_macs(frontend.CLASSES, count.layers[-1].out_shape[1:], None, (),
                               "same", "deconv")
            assert flops == round(row.tflop * 1e12) + 2 * 2 * batch * deconv.total
            margin = context_margin("tiny", "valid")
            assert f"{size[0] + 2 * margin}x{size[1] + 2 * margin} image crops" in row.case
        else:
            work = count.total if args["mode"] == "forward" else count.training()
            assert round(row.tflop * 1e12) == 2 * batch * work
            # on the CPU the row first runs one forward of the image (<= 64x64 px here)
            assert flops == round(row.tflop * 1e12) + 2 * batch * count.total
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(printed) == len(plan) + 1  # each row as it is measured, the failed one too


def test_synthetic_cityscapes_tree_is_read_as_cityscapes(tmp_path):
    """The cache case's data: the real Cityscapes layout, labelIds mapped to train ids."""
    context_cache = bench("context_cache")
    from dilatedseg.data import CityscapesDataModule

    decode = context_cache.make_cityscapes(tmp_path, images=3, size=(32, 64), distinct=2)
    assert decode["image_kib"] > 0
    images = sorted(tmp_path.glob("leftImg8bit/train/*/*_leftImg8bit.png"))
    labels = sorted(tmp_path.glob("gtFine/train/*/*_gtFine_labelIds.png"))
    assert len(images) == len(labels) == 3
    assert Image.open(images[0]).mode == "RGB" and Image.open(images[0]).size == (64, 32)
    data = CityscapesDataModule(root=str(tmp_path), num_workers=0)
    data.setup("fit")
    item = data.datasets["train"][2]  # a copy of the first scene
    assert item["label"].shape == (32, 64)
    train_ids = set(np.unique(item["label"].numpy()).tolist())
    assert train_ids <= set(range(19)) | {255} and 0 in train_ids  # road, the background


def test_cache_section_in_cityscapes_geometry_at_a_tiny_size():
    """The GPU's cache case, shrunk (tiny front-end, 64x128 images, one worker) but through
    the same code: bf16-mixed, the recipe's module, workers, cache build, both epochs; then
    the rows run.py makes of it, and of the shapes case."""
    run, context_cache = bench("run"), bench("context_cache")
    city, shapes = run.cache_settings(torch.device("cuda"), quick=True)
    assert city == dict(size=(1024, 2048), images=32, batch_size=4, epochs=3, arch="vgg16")
    inspect.signature(context_cache.run_cityscapes).bind(**city)
    for setting in shapes:
        inspect.signature(context_cache.run).bind(**setting)

    r = context_cache.run_cityscapes(**{**city, "size": (64, 128), "images": 2,
                                        "batch_size": 2, "epochs": 2, "arch": "tiny",
                                        "num_workers": 1, "precision": "bf16-mixed"})
    assert (r["size"], r["images"], r["workers"], r["precision"]) == \
        ((64, 128), 2, 1, "bf16-mixed")
    assert len(r["epochs_s"]) == len(r["epochs_cached_s"]) == 2
    assert r["epoch_s"] == min(r["epochs_s"][1:]) and r["cache_build_s"] > 0
    assert r["speedup"] == pytest.approx(r["epoch_s"] / r["epoch_cached_s"])
    plain, cached = run.cityscapes_cache_rows(r, "CPU")
    assert "front-end every step" in plain.case and "cached logits" in cached.case
    assert (plain.precision, plain.batch, plain.ms) == ("bf16", 2, r["epoch_s"] * 1e3)
    assert cached.throughput == pytest.approx(2 / r["epoch_cached_s"])
    assert f"{r['speedup']:.1f}x faster per epoch" in cached.note

    (shape,) = context_cache.run(sizes=(64,), images=4, batch_size=2, epochs=2, arch="tiny")
    plain, cached = run.shapes_cache_rows(shape, "CPU")
    assert plain.ms == shape["epoch_s"] * 1e3 and cached.ms == shape["epoch_cached_s"] * 1e3
    assert "shapes 64x64, 4 images" in cached.case


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_context_rows(precision):
    """The context section's rows (its GPU rows add torch.compile to the same function)."""
    context = bench("context")
    for mode in ("forward", "fwd+bwd"):
        row, flops = counted_flops(context.context_row, CPU, "basic", "dilation10", 19,
                                   (16, 24), 2, mode, precision, 1, PEAKS[precision])
        count = context_macs(19, "basic", "dilation10", 16, 24)
        work = count.total if mode == "forward" else count.training()
        assert round(row.tflop * 1e12) == 2 * 2 * work
        assert flops == 2 * round(row.tflop * 1e12) if mode == "forward" else \
            round(row.tflop * 1e12) + 2 * 2 * count.total  # (one warm-up call)
        check_mfu(row, PEAKS[precision])


def test_conv_variants_every_case_on_the_cpu(capsys):
    conv_variants = bench("conv_variants")
    # The layers' inputs are those of a 512x1024 training crop in valid geometry.
    shapes = {layer.name: layer.out_shape for layer in frontend_macs("vgg16", 512, 1024).layers}
    assert conv_variants.LAYERS["fc6"][-1] == shapes["conv5_3"][1:]
    assert conv_variants.LAYERS["conv5"][-1] == shapes["conv4_3"][1:]
    tiny = {"fc6": (8, 16, 7, 4, (30, 33)), "conv5": (8, 8, 3, 2, (12, 14))}
    for index in range(len(conv_variants.CASES)):
        conv_variants.measure(index, "cpu", tiny)
    results = [line for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT")]
    assert len(results) == len(conv_variants.CASES)
    for line, (layer, batch, *_) in zip(results, conv_variants.CASES):
        cin, cout, kernel, dilation, (h, w) = tiny[layer]
        out = (h - dilation * (kernel - 1)) * (w - dilation * (kernel - 1))
        tflop = float(re.search(r"\(([\d.e+-]+) TFLOP fwd\+bwd\)", line).group(1))
        assert tflop == pytest.approx(3 * 2 * batch * cin * cout * kernel**2 * out / 1e12,
                                      rel=1e-2)
    conv_variants.main(["--deadline", "0"])
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + len(conv_variants.CASES) and "not run (deadline)" in table[-1]


def test_profile_fc6_whole_step_and_fc6_shapes(capsys):
    profile_fc6 = bench("profile_fc6")
    (channels, h, w), macs = profile_fc6.fc6_shapes(512, 1024)
    assert (channels, h, w) == (512, 88, 152) and macs == 512 * 4096 * 49 * 64 * 128
    profile_fc6.main(["--whole", "--arch", "tiny", "--size", "16", "32", "--batch", "2",
                      "--rows", "3", "--peak-tflops", "1"])
    out = capsys.readouterr().out
    flop = 2 * 2 * frontend_macs("tiny", 16, 32, "valid", 19).training()
    assert f"; {flop / 1e12:.4g} TFLOP forward + backward" in out
    assert re.findall(r"^== (.+?): forward \+ backward", out, re.M) == \
        ["space-to-batch fc6", "plain dilated fc6"]
    assert out.count("| kernel | calls | time (ms) | share | class |") == 2
    assert "MFU" in out


def test_data_section_rows():
    rows = bench("data").run(quick=True)
    cases = [row.case for row in rows]
    assert cases[0] == "decode Cityscapes PNG 2048x1024"
    assert sum(row.bench == "data, workers per GPU" for row in rows) == 3
    assert all(row.ms > 0 and row.runs == 5 for row in rows if row.bench == "data, 1 worker")


def test_run_main_writes_the_table_and_json(tmp_path, monkeypatch, capsys):
    """run.py end to end with the crf section on a small scene and a section that fails: the
    failure is a row, the other section's rows are kept, the JSON parses."""
    run, crf = bench("run"), bench("crf")
    scene = crf.synthetic_scene(96, 128)
    monkeypatch.setattr(crf, "load_scene", lambda: (*scene, "synthetic"))

    def broken(device, args):
        raise RuntimeError("section broke")

    monkeypatch.setitem(run.RUNNERS, "context", broken)
    path = tmp_path / "bench.json"
    run.main(["--quick", "--only", "crf", "context", "--json", str(path)])
    result = json.loads(path.read_text())
    assert result["quick"] is True and set(result["section_seconds"]) == {"crf", "context"}
    rows = result["rows"]
    crf_rows = [row for row in rows if row["bench"] == "CRF"]
    assert len(crf_rows) == (3 if crf.dcrf is None else 4)
    assert all("128x96 synthetic" in row["case"] for row in crf_rows)
    assert crf_rows[-1]["device"] == "CUDA GPU" and crf_rows[-1]["ms"] is None
    assert rows[-1]["case"] == "failed" and rows[-1]["note"] == "RuntimeError: section broke"
    out = capsys.readouterr().out
    assert out.count("| benchmark | case |") == 1 and f"wrote {path}" in out


def test_gpu_check_script_commands_exist():
    """bash -n passes, and each step's script, section, flag and test file exists."""
    script = REPO / "benchmarks/gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    run = bench("run")
    sections = re.findall(r"^(?:TAIL=\d+ )?bench \w+ \d+ ([\w ]+)$", text, re.M)
    assert sections and {s for line in sections for s in line.split()} <= set(run.SECTIONS)
    commands = re.findall(r"python3 (benchmarks/\w+\.py)([^\n]*)", text)
    assert {path for path, _ in commands} == {"benchmarks/run.py", "benchmarks/conv_variants.py",
                                             "benchmarks/profile_fc6.py"}
    for path, arguments in commands:
        source = (REPO / path).read_text()
        for flag in re.findall(r"--[\w-]+", arguments):
            assert f'"{flag}"' in source, f"{path} has no {flag}"
    for test_file in re.findall(r"tests/\w+\.py", text):
        assert (REPO / test_file).is_file(), test_file
