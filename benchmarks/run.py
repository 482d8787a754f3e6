"""`make bench`: every performance figure of the project in one Markdown table (+ JSON).

    python3 benchmarks/run.py                         # all sections (CPU: ~10 minutes on 2 cores)
    python3 benchmarks/run.py --quick                 # fewer sizes / repetitions (CPU: ~3 min)
    python3 benchmarks/run.py --only frontend context # some sections
    python3 benchmarks/run.py --peak-tflops 989       # MFU against this peak

Sections: ``frontend`` (dilated VGG-16 forward / forward+backward, whole-Segmenter inference on
a Cityscapes image; benchmarks/frontend.py), ``context`` (context modules;
benchmarks/context.py), ``data`` (decoding and augmentation per worker; benchmarks/data.py),
``cache`` (context-stage epoch with / without the feature cache; benchmarks/context_cache.py),
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
from common import NO_CUDA, Row, bench_device, device_label, machine, markdown  # noqa: E402

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


def cache_rows(device, args) -> list[Row]:
    import context_cache

    if device.type == "cuda":
        settings = [dict(sizes=(256,), images=64, batch_size=16, epochs=3, arch="vgg16")]
    elif args.quick:
        settings = [dict(sizes=(128,), images=32, batch_size=16, epochs=2, arch="tiny")]
    else:  # the real front-end too, on small images: ~2 minutes on 2 cores
        settings = [dict(sizes=(128, 256), images=64, batch_size=16, epochs=3, arch="tiny"),
                    dict(sizes=(64,), images=8, batch_size=4, epochs=3, arch="vgg16")]
    rows = []
    label = device_label(device)
    results = [r for setting in settings for r in context_cache.run(**setting)]
    for r in results:
        case = f"{r['arch']} front-end, shapes {r['size']}x{r['size']}, {r['images']} images"
        rows.append(Row("context-stage epoch", case + ", front-end every step", label,
                        batch=r["batch_size"], ms=r["epoch_s"] * 1e3,
                        throughput=r["images"] / r["epoch_s"],
                        note=f"cache build once: {r['cache_build_s']:.1f} s"))
        verdict = "meets" if r["speedup"] >= CACHE_TARGET else "below"
        rows.append(Row("context-stage epoch", case + ", cached logits", label,
                        batch=r["batch_size"], ms=r["epoch_cached_s"] * 1e3,
                        throughput=r["images"] / r["epoch_cached_s"],
                        note=f"{r['speedup']:.1f}x faster per epoch ({verdict} the "
                             f">= {CACHE_TARGET:.0f}x target)"))
    if device.type != "cuda":
        rows.append(Row("context-stage epoch", "vgg16 front-end, cached vs not", "CUDA GPU",
                        note=NO_CUDA + f"; target >= {CACHE_TARGET:.0f}x (on CPU the tiny "
                        "front-end costs little more than the context module itself)"))
    return rows


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
