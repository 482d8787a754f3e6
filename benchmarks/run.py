"""`make bench`: every performance figure of the project in one Markdown table (+ JSON).

    python3 benchmarks/run.py                         # all sections (CPU: ~10 minutes on 2 cores)
    python3 benchmarks/run.py --quick                 # fewer sizes / repetitions (CPU: ~3 min)
    python3 benchmarks/run.py --only frontend context # some sections
    python3 benchmarks/run.py --peak-tflops 989       # MFU against this peak

Sections: ``frontend`` (dilated VGG-16 forward / forward+backward, whole-Segmenter inference on
a Cityscapes image; benchmarks/frontend.py), ``context`` (context modules;
benchmarks/context.py), ``data`` (decoding and augmentation per worker; benchmarks/data.py),
``cache`` (context-stage epoch with / without the feature cache, in Cityscapes geometry, the
target's, and on the shapes set; benchmarks/context_cache.py),
``crf`` (dense CRF; benchmarks/crf.py). FLOPs are analytic (:mod:`dilatedseg.flops`); MFU =
achieved FLOP/s over the device's dense peak (known GPUs, or ``--peak-tflops``). Rows that
need a GPU say "not measured (no CUDA device)" on a machine without one. The table is also
written as JSON (default bench-results/bench.json) with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    NO_CUDA,
    Row,
    add_row,
    bench_device,
    device_label,
    machine,
    markdown,
)

SECTIONS = ("frontend", "context", "data", "cache", "crf")
CACHE_TARGET = 20.0


def frontend_rows(device, args) -> list[Row]:
    import frontend

    return frontend.run(device, args.quick, args.peak_tflops)


def context_rows(device, args) -> list[Row]:
    import context

    rows = context.run(device, args.quick, args.peak_tflops)
    if device.type != "cuda":
        rows.append(Row("context module", "all cases, fp32 / bf16 / torch.compile", "CUDA GPU",
                        "bf16", note=NO_CUDA + "; launch-bound there: see the compiled rows"))
    return rows


def data_rows(device, args) -> list[Row]:
    import data

    return data.run(device, args.quick)


def cache_settings(device, quick: bool) -> tuple[dict, list[dict]]:
    """The arguments of context_cache.run_cityscapes, and of each context_cache.run, here."""
    if device.type == "cuda":
        cityscapes = dict(size=(1024, 2048), images=32, batch_size=4, epochs=3, arch="vgg16")
        return cityscapes, [dict(sizes=(256,), images=64, batch_size=16, epochs=3,
                                 arch="vgg16")]
    if quick:  # the Cityscapes code path at a small size: seconds
        cityscapes = dict(size=(128, 256), images=8, batch_size=2, epochs=2, arch="tiny")
        return cityscapes, [dict(sizes=(128,), images=32, batch_size=16, epochs=2, arch="tiny")]
    # the real front-end too, on small images: ~2 minutes on 2 cores
    cityscapes = dict(size=(128, 256), images=16, batch_size=4, epochs=3, arch="tiny")
    return cityscapes, [dict(sizes=(128, 256), images=64, batch_size=16, epochs=3, arch="tiny"),
                        dict(sizes=(64,), images=8, batch_size=4, epochs=3, arch="vgg16")]


def cache_rows(device, args) -> list[Row]:
    """The Cityscapes-geometry case first (the target's: see benchmarks/context_cache.py), then
    the shapes case(s). Each row is printed as it is measured."""
    import context_cache

    cityscapes, settings = cache_settings(device, args.quick)
    rows: list[Row] = []
    label = device_label(device)
    try:
        city = cityscapes_cache_rows(context_cache.run_cityscapes(**cityscapes), label)
    except Exception as error:  # noqa: BLE001 - the shapes rows still run
        traceback.print_exc()
        city = [Row("context-stage epoch", "Cityscapes geometry: failed", label,
                    note=f"{type(error).__name__}: {error}"[:200])]
    for row in city:
        if device.type != "cuda":
            row.note = "CPU, small images: a check of the code path, not the target; " + row.note
        add_row(rows, row)
    for setting in settings:
        for r in context_cache.run(**setting):
            for row in shapes_cache_rows(r, label):
                add_row(rows, row)
    if device.type != "cuda":
        rows.append(Row("context-stage epoch", "Cityscapes geometry, vgg16 front-end, 32 "
                        "images 1024x2048, cached vs not", "CUDA GPU", "bf16",
                        note=NO_CUDA + f"; target >= {CACHE_TARGET:.0f}x (on CPU the tiny "
                        "front-end costs little more than the context module itself)"))
    return rows


def shapes_cache_rows(r: dict, label: str) -> list[Row]:
    """The two rows of one of context_cache.run's results."""
    case = f"{r['arch']} front-end, shapes {r['size']}x{r['size']}, {r['images']} images"
    plain = Row("context-stage epoch", case + ", front-end every step", label,
                batch=r["batch_size"], ms=r["epoch_s"] * 1e3,
                throughput=r["images"] / r["epoch_s"],
                note=f"cache build once: {r['cache_build_s']:.1f} s")
    verdict = "meets" if r["speedup"] >= CACHE_TARGET else "below"
    cached = Row("context-stage epoch", case + ", cached logits", label,
                 batch=r["batch_size"], ms=r["epoch_cached_s"] * 1e3,
                 throughput=r["images"] / r["epoch_cached_s"],
                 note=f"{r['speedup']:.1f}x faster per epoch ({verdict} the "
                      f">= {CACHE_TARGET:.0f}x target, in this geometry only: "
                      "not Cityscapes')")
    return [plain, cached]


def cityscapes_cache_rows(r: dict, label: str) -> list[Row]:
    """The two rows of context_cache.run_cityscapes's result."""
    h, w = r["size"]
    case = (f"Cityscapes geometry: {r['arch']} front-end (valid), Dilation10 + deconv to "
            f"{h}x{w}, {r['images']} synthetic {h}x{w} leftImg8bit / labelIds PNGs, whole "
            f"images, {r['workers']} workers")
    precision = "bf16" if r["precision"] == "bf16-mixed" else "fp32"
    epochs = len(r["epochs_s"]) - 1 or 1
    plain = Row("context-stage epoch", case + ", front-end every step", label, precision,
                r["batch_size"], r["epoch_s"] * 1e3, r["images"] / r["epoch_s"],
                note=f"fastest of the {epochs} epoch(s) after the first; its first step after "
                     f"{r['first_step_s'] * 1e3:.0f} ms (workers decoding); one synthetic "
                     f"image decodes in {r['image_decode_s'] * 1e3:.0f} ms "
                     f"({r['image_kib']:.0f} KiB), its label in "
                     f"{r['label_decode_s'] * 1e3:.0f} ms")
    worst = min(r["speedup"], r["speedup_after_first_step"])
    verdict = "meets" if worst >= CACHE_TARGET else "below"
    cached = Row("context-stage epoch", case + ", cached logits", label, precision,
                 r["batch_size"], r["epoch_cached_s"] * 1e3,
                 r["images"] / r["epoch_cached_s"],
                 note=f"{r['speedup']:.1f}x faster per epoch, "
                      f"{r['speedup_after_first_step']:.1f}x after each epoch's first step "
                      f"(first step after {r['first_step_cached_s'] * 1e3:.0f} ms): {verdict} "
                      f"the >= {CACHE_TARGET:.0f}x target (both must meet it); cache build "
                      f"once: {r['cache_build_s']:.1f} s")
    return [plain, cached]


def crf_rows(device, args) -> list[Row]:
    import crf

    r = crf.measure(repeats=1 if args.quick else 3, peak_memory=False)
    case = (f"dense CRF, {r['iterations']} mean-field iterations, {r['size']} {r['image']}, "
            f"{r['classes']} labels")
    ref = r["cpu_s"].get("pydensecrf")
    rows = []

    def row(name, device_text, seconds):
        note = f"{seconds / ref:.2f}x pydensecrf's time" if ref else ""
        rows.append(Row("CRF", f"{case}: {name}", device_text, "fp32", 1, seconds * 1e3,
                        1 / seconds, note=note))

    row("dilatedseg", f"CPU, {r['threads']} threads", r["cpu_s"]["ours"])
    row("dilatedseg", "CPU, 1 thread", r["cpu_s"]["ours_1thread"])
    if ref:
        row("pydensecrf (reference)", "CPU, 1 thread", ref)
    else:
        rows[-1].note = "pydensecrf not installed (pip install pydensecrf2): no reference"
    if "cuda_s" in r:
        row("dilatedseg", r["cuda_device"], r["cuda_s"])
    else:
        rows.append(Row("CRF", f"{case}: dilatedseg", "CUDA GPU", "fp32", 1, note=NO_CUDA))
    return rows


RUNNERS = {"frontend": frontend_rows, "context": context_rows, "data": data_rows,
           "cache": cache_rows, "crf": crf_rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        metavar="SECTION", help=f"sections to run, of {', '.join(SECTIONS)}")
    parser.add_argument("--peak-tflops", type=float,
                        help="device peak for MFU (default: a table of known GPUs)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/bench.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = bench_device()
    info = machine()
    info["load_average_start"] = os.getloadavg()[0]  # other jobs only ever add time
    print(f"machine: {info['cpu']} ({info['cpu_cores']} cores), torch {info['torch']} with "
          f"{info['torch_threads']} threads, GPU: {info['gpu'] or 'none'}; load average "
          f"{info['load_average_start']:.1f} at the start", flush=True)
    rows: list[Row] = []
    seconds = {}
    for name in args.only:
        start = time.perf_counter()
        print(f"running {name} ...", flush=True)
        try:
            section = RUNNERS[name](device, args)
        except Exception as error:  # noqa: BLE001 - one failing section must not hide the rest
            traceback.print_exc()
            section = [Row(name, "failed", device_label(device),
                           note=f"{type(error).__name__}: {error}"[:200])]
        seconds[name] = time.perf_counter() - start
        rows += section
        write_json(args.json, info, args.quick, seconds, rows)  # a run cut short keeps these
    print()
    print(markdown(rows))
    print("\nsection times: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
          + f"; load average {info['load_average_end']:.1f} at the end")
    print(f"wrote {args.json}")


def write_json(path: Path, info: dict, quick: bool, seconds: dict, rows: list[Row]) -> None:
    info["load_average_end"] = os.getloadavg()[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, "quick": quick, "section_seconds": seconds,
                                "rows": [r.as_dict() for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
