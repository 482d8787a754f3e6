"""The default `make train` pipeline on the embedded dataset, timed, for several seeds.

Runs frontend -> context -> crf exactly as `make train` does (same configs, through the
`dilatedseg` command in subprocesses), each seed with its own generated data and runs
directory, and reports wall time and validation mIoU per stage, plus whether the targets hold:
the whole pipeline within 5 minutes, and context beating the front-end by >= 20 mIoU points.

    python benchmarks/pipeline.py [--seeds 0 1 2] [--json bench-results/pipeline.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from common import cpu_model

from dilatedseg.summary import latest_summaries

REPO = Path(__file__).resolve().parent.parent
STAGES = ("frontend", "context", "crf")
TIME_LIMIT_S = 300
MIN_CONTEXT_GAIN = 20.0


def stage_argv(stage: str, seed: int, runs_dir: Path, data_root: Path) -> list[str]:
    argv = ["dilatedseg", "fit", "--config", "conf/shapes.yaml",
            "--config", f"conf/stage/{stage}.yaml"]
    if (REPO / "conf" / "shapes" / f"{stage}.yaml").is_file():
        argv += ["--config", f"conf/shapes/{stage}.yaml"]
    return argv + [f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
                   f"--data.init_args.root={data_root}", f"--runs_dir={runs_dir}",
                   "--trainer.enable_progress_bar=false"]


def run_seed(seed: int, work: Path) -> dict:
    runs_dir, data_root = work / f"seed{seed}" / "runs", work / f"seed{seed}" / "data"
    start = time.time()
    for stage in STAGES:
        subprocess.run(stage_argv(stage, seed, runs_dir, data_root), cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = time.time() - start
    scores = {row["stage"]: row["best_val_mIoU"] for row in latest_summaries(str(runs_dir),
                                                                             "shapes")}
    return {"seed": seed, "seconds": round(total, 1), **scores,
            "context_gain": round(scores["context"] - scores["frontend"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default="bench-results/pipeline")
    parser.add_argument("--json", default="bench-results/pipeline.json")
    args = parser.parse_args()
    work = REPO / args.work
    rows = [run_seed(seed, work) for seed in args.seeds]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores\n")
    print("| seed | total (s) | frontend | context | crf | context - frontend |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['seed']} | {row['seconds']} | {row['frontend']:.1f} | {row['context']:.1f}"
              f" | {row['crf']:.1f} | {row['context_gain']:+.1f} |")
    ok_time = all(row["seconds"] <= TIME_LIMIT_S for row in rows)
    ok_gain = all(row["context_gain"] >= MIN_CONTEXT_GAIN for row in rows)
    print(f"\nwithin {TIME_LIMIT_S} s: {ok_time}; context gain >= {MIN_CONTEXT_GAIN}: {ok_gain}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "within_time": ok_time,
                                           "context_gain_ok": ok_gain}, indent=2))


if __name__ == "__main__":
    main()
