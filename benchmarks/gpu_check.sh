#!/usr/bin/env bash
# The GPU checks of the performance targets in one command, sized for a ~10-minute slot on a
# lent GPU machine: the GPU tests, the fc6 kernel profile and `make bench --quick`, each under
# its own time limit and each writing its output into $OUT (default bench-results/) as soon as
# it ends, so a slot that runs out still returns what finished.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# The machine needs torch (CUDA), lightning and torchmetrics; the data sections and the Lightning
# fit test also need albumentations, which an image without it gets from wheels in .whl/
# (see README, "make bench").
set -u
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/dilatedseg-site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/dilatedseg-site"
fi
step() {  # step NAME SECONDS COMMAND...: run it, output into $OUT/NAME.txt, then its tail
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most $limit s)"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "exit status $?" >> "$OUT/$name.txt"
    tail -n 12 "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv \
    > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
step tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_crf.py \
    tests/test_lattice.py
step profile_fc6 90 python3 benchmarks/profile_fc6.py
step bench 330 python3 benchmarks/run.py --quick --json "$OUT/bench.json"
