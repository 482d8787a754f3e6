"""Dense CRF: dilatedseg's pure-PyTorch mean field against pydensecrf (Krähenbühl's C++ code).

    python benchmarks/crf.py [--json out.json] [--repeats 5] [--threads 2]

Same image (VOC 2011_000006 when ../shared/realdata is there, else a synthetic 500x375 one),
same 21-label unaries (noisy one-hot of the ground truth or of the synthetic shapes), same
parameters (pydensecrf with NORMALIZE_AFTER), 10 iterations. Reports argmax agreement, the
largest difference of the marginals, CPU time (lattice construction + inference, median;
pydensecrf is single-threaded), peak memory (in a fresh process each) and CUDA time if there
is a GPU. pydensecrf (`pip install pydensecrf2`) is optional: without it only ours is timed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_model

from dilatedseg.models.crf import DenseCRF

VOC = Path(__file__).resolve().parents[2] / "shared/realdata/voc"
IMAGE_ID = "2011_000006"
PARAMS = dict(theta_alpha=160.0, theta_beta=3.0, theta_gamma=3.0,
              spatial_weight=3.0, bilateral_weight=5.0)
CLASSES, ITERATIONS = 21, 10

try:
    import pydensecrf.densecrf as dcrf
except ImportError:  # optional reference
    dcrf = None


def synthetic_scene(h: int = 375, w: int = 500, seed: int = 0):
    """Smooth gradients, a few shapes and noise; labels are the shapes (0 = background)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.stack([90 + 60 * xs / w, 110 + 50 * ys / h, 140 - 40 * xs / w], -1)
    labels = np.zeros((h, w), np.uint8)
    for k in range(1, 9):
        cy, cx, r = rng.uniform(40, h - 40), rng.uniform(40, w - 40), rng.uniform(20, 70)
        mask = ((ys - cy) / r) ** 2 + ((xs - cx) / (r * rng.uniform(0.6, 1.6))) ** 2 < 1
        if k % 2:
            mask = (abs(ys - cy) < r) & (abs(xs - cx) < 1.3 * r)
        labels[mask] = rng.integers(1, CLASSES)
        image[mask] = rng.uniform(0, 255, 3) + 15 * np.sin(xs[mask, None] / 11)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8), labels


def load_scene():
    """(image uint8 HxWx3, labels HxW, source name)."""
    jpg, png = VOC / "JPEGImages" / f"{IMAGE_ID}.jpg", VOC / "SegmentationClass" / f"{IMAGE_ID}.png"
    if jpg.exists():
        from PIL import Image

        image = np.array(Image.open(jpg).convert("RGB"))
        if png.exists():
            labels = np.array(Image.open(png))  # palette indices, 255 = void
            labels[labels >= CLASSES] = 0
        else:
            labels = synthetic_scene(*image.shape[:2])[1]
        return np.ascontiguousarray(image), labels, f"VOC {IMAGE_ID}.jpg"
    image, labels = synthetic_scene()
    return image, labels, "synthetic"


def unary_logits(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Noisy one-hot logits (C, H, W) float32: smooth errors plus per-pixel noise."""
    rng = np.random.default_rng(seed)
    h, w = labels.shape
    coarse = torch.from_numpy(rng.normal(0, 1.0, (1, CLASSES, h // 25 + 1, w // 25 + 1)))
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")[0].numpy()
    onehot = np.eye(CLASSES, dtype=np.float32)[labels].transpose(2, 0, 1)
    return (2.0 * onehot + smooth + rng.normal(0, 1.0, (CLASSES, h, w))).astype(np.float32)


def run_ours(image: np.ndarray, logits: np.ndarray, device: str = "cpu") -> np.ndarray:
    crf = DenseCRF(CLASSES, test_iterations=ITERATIONS, **PARAMS).eval().to(device)
    im = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device)
    with torch.no_grad():
        out = crf(torch.from_numpy(logits)[None].to(device), im)
        return torch.softmax(out[0], 0).reshape(CLASSES, -1).cpu().numpy()


def run_pydensecrf(image: np.ndarray, logits: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    d = dcrf.DenseCRF2D(w, h, CLASSES)
    d.setUnaryEnergy(np.ascontiguousarray(-logits.reshape(CLASSES, -1)))
    d.addPairwiseGaussian(sxy=PARAMS["theta_gamma"], compat=PARAMS["spatial_weight"],
                          kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_AFTER)
    d.addPairwiseBilateral(sxy=PARAMS["theta_alpha"], srgb=PARAMS["theta_beta"], rgbim=image,
                           compat=PARAMS["bilateral_weight"], kernel=dcrf.DIAG_KERNEL,
                           normalization=dcrf.NORMALIZE_AFTER)
    return np.array(d.inference(ITERATIONS))


def timed(fn, *args) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_memory_child(name: str, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    image, labels, _ = load_scene()
    logits = unary_logits(labels)
    try:  # reset the peak (VmHWM) to the current resident set (Linux)
        Path("/proc/self/clear_refs").write_text("5")
        before, peak = _status_kib("VmRSS"), lambda: _status_kib("VmHWM")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    (run_ours if name == "ours" else run_pydensecrf)(image, logits)
    queue.put((peak() - before) / 1024)


def peak_memory_mib(name: str, threads: int) -> float:
    """Growth of the peak resident set while running one CRF, in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(name, threads, queue))
    proc.start()
    value = queue.get(timeout=600)
    proc.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    result = measure(args.repeats, args.threads)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def measure(repeats: int = 5, threads: int | None = None, peak_memory: bool = True) -> dict:
    """Time (and compare) the CRFs; the dict :func:`print_table` prints."""
    args = argparse.Namespace(repeats=repeats, threads=threads or torch.get_num_threads())
    image, labels, source = load_scene()
    logits = unary_logits(labels)
    h, w = labels.shape
    result = {"image": source, "size": f"{w}x{h}", "classes": CLASSES, "iterations": ITERATIONS,
              "params": PARAMS, "cpu": cpu_model(),
              "threads": args.threads, "torch": torch.__version__}

    torch.set_num_threads(args.threads)
    ours = run_ours(image, logits)  # warm-up
    times = {"ours": [], "ours_1thread": []}
    if dcrf is not None:
        ref = run_pydensecrf(image, logits)
        times["pydensecrf"] = []
        result["argmax_agreement_pct"] = 100.0 * float((ours.argmax(0) == ref.argmax(0)).mean())
        result["max_abs_dQ"] = float(np.abs(ours - ref).max())
        result["unary_vs_pydensecrf_argmax_changed_pct"] = 100.0 * float(
            (logits.reshape(CLASSES, -1).argmax(0) != ref.argmax(0)).mean())
    for _ in range(args.repeats):  # interleaved, so that load changes hit all alike
        torch.set_num_threads(args.threads)
        times["ours"].append(timed(run_ours, image, logits))
        torch.set_num_threads(1)
        times["ours_1thread"].append(timed(run_ours, image, logits))
        if dcrf is not None:
            times["pydensecrf"].append(timed(run_pydensecrf, image, logits))
    torch.set_num_threads(args.threads)
    result["cpu_s"] = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    # CPU time consumed (all threads): less sensitive than wall time to other load
    result["process_cpu_s"] = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    result["load_average_1min"] = os.getloadavg()[0]
    if dcrf is not None:
        result["cpu_ratio_ours_over_pydensecrf"] = result["cpu_s"]["ours"] / result["cpu_s"][
            "pydensecrf"]
    result["peak_mib"] = {"ours": peak_memory_mib("ours", args.threads) if peak_memory else None}
    if dcrf is not None:
        result["peak_mib"]["pydensecrf"] = (peak_memory_mib("pydensecrf", 1) if peak_memory
                                            else None)

    if torch.cuda.is_available():
        run_ours(image, logits, "cuda")
        gpu = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            gpu.append(timed(run_ours, image, logits, "cuda")[0])
        result["cuda_s"] = statistics.median(gpu)
        result["cuda_device"] = torch.cuda.get_device_name()
        if dcrf is not None:
            result["speedup_cuda_vs_pydensecrf_cpu"] = result["cpu_s"]["pydensecrf"] / result[
                "cuda_s"]
    return result


def print_table(r: dict) -> None:
    print(f"Dense CRF, {r['image']} ({r['size']}), {r['classes']} labels, "
          f"{r['iterations']} mean-field iterations, {r['cpu']}, torch {r['torch']}, "
          f"load average {r['load_average_1min']:.1f} at the end\n")
    if "argmax_agreement_pct" in r:
        print(f"argmax agreement with pydensecrf: {r['argmax_agreement_pct']:.3f} %  "
              f"(the CRF changes {r['unary_vs_pydensecrf_argmax_changed_pct']:.1f} % of the "
              f"unary argmax); max |dQ|: {r['max_abs_dQ']:.2e}\n")
    print("| implementation | device | wall time (s, median) | vs pydensecrf | "
          "process CPU time (s) | peak memory (MiB) |")
    print("|---|---|---|---|---|---|")
    ref = r["cpu_s"].get("pydensecrf")
    cpu = r["process_cpu_s"]
    rows = [("dilatedseg DenseCRF", f"CPU, {r['threads']} threads", r["cpu_s"]["ours"],
             cpu["ours"], r["peak_mib"]["ours"]),
            ("dilatedseg DenseCRF", "CPU, 1 thread", r["cpu_s"]["ours_1thread"],
             cpu["ours_1thread"], None)]
    if ref is not None:
        rows.append(("pydensecrf", "CPU, 1 thread", ref, cpu["pydensecrf"],
                     r["peak_mib"]["pydensecrf"]))
    if "cuda_s" in r:
        rows.append(("dilatedseg DenseCRF", r["cuda_device"], r["cuda_s"], None, None))
    for name, device, seconds, cpu_s, mem in rows:
        ratio = f"{seconds / ref:.2f}x" if ref else "-"
        cpu_s = f"{cpu_s:.3f}" if cpu_s is not None else "-"
        mem_s = f"{mem:.0f}" if mem is not None else "-"
        print(f"| {name} | {device} | {seconds:.3f} | {ratio} | {cpu_s} | {mem_s} |")


if __name__ == "__main__":
    main()
