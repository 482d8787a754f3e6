#!/usr/bin/env bash
# The GPU checks of the performance targets in one command, sized for one ~9-minute slot on a
# lent GPU machine. Steps run in order of importance (the targets first), each under its own
# time limit and all under one deadline, so a slot that runs short loses the least important:
#   gpu        nvidia-smi, versions, a bf16 matrix-product ceiling
#   frontend   `benchmarks/run.py --only frontend`: the MFU target twice (the network's
#              fwd+bwd with a mean-square loss, then the whole training step of the module:
#              deconv, cross-entropy, SGD) and the inference target
#   cache      `--only cache`: the cached context-stage target in Cityscapes geometry (32
#              synthetic 1024x2048 images, Dilation10 + deconv, whole images; estimated ~1 min), then
#              the shapes case
#   conv       benchmarks/conv_variants.py: fc6 / conv5 as dilated, space-to-batch, im2col
#   tests      the CUDA tests (tests/test_cuda.py, the CRF / lattice CUDA tests)
#   fc6        benchmarks/profile_fc6.py at 1024x2048: fc6's kernels, three ways
#   whole      profile_fc6.py --whole at 512x1024, batch 8: where a training step's time goes
#   crf_data   `--only crf data`
#   context    `--only context` (torch.compile rows: the slowest to start)
# Budget of `bash benchmarks/gpu_check.sh 480` (limits; unused time flows on): gpu 40 s,
# frontend 210 s, cache 150 s, then conv and the rest in what is left (~80 s at most).
# Each step's output goes to $RESULTS/<step>.txt (JSON beside the bench steps) and, after every
# step, into $OUT/results.tar, so what finished comes back even if the slot ends early.
#
#   bash benchmarks/gpu_check.sh [DEADLINE_SECONDS]     # from the repository root; default 500
#
# The machine needs torch (CUDA), lightning and torchmetrics; the data-loading steps also need
# albumentations, which an image without it gets from wheels in .whl/ (see README, "make bench").
set -u
DEADLINE=$((SECONDS + ${1:-500}))
OUT=${OUT:-bench-results}
RESULTS=${RESULTS:-/tmp/dilatedseg-gpu-check}
mkdir -p "$OUT" "$RESULTS"
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/dilatedseg-site \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/dilatedseg-site"
fi
step() {  # step NAME SECONDS COMMAND...: run it under min(SECONDS, time left), keep its output
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS))
    shift 2
    if ((left < 15)); then
        echo "== $name: skipped, the deadline is reached" | tee "$RESULTS/$name.txt"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most $limit s)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$RESULTS/$name.txt" 2>&1
    echo "exit status $? after $((SECONDS - start)) s" >> "$RESULTS/$name.txt"
    tail -n "${TAIL:-6}" "$RESULTS/$name.txt"
    tar -cf "$OUT/results.tar.part" -C "$RESULTS" . && mv "$OUT/results.tar.part" "$OUT/results.tar"
}
bench() {  # bench NAME SECONDS SECTION...
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" python3 benchmarks/run.py --quick --only "$@" \
        --json "$RESULTS/$name.json"
}
TAIL=12 step gpu 40 bash -c 'nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version \
    --format=csv; python3 -c "
import torch, lightning, torchmetrics
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\",
      torch.backends.cudnn.version(), \"lightning\", lightning.__version__,
      \"torchmetrics\", torchmetrics.__version__)
a, b = (torch.randn(8192, 8192, device=\"cuda\", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3):
    a @ b
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(10):
    a @ b
end.record()
torch.cuda.synchronize()
print(f\"bf16 8192^3 matrix product: {2 * 8192**3 * 10 / start.elapsed_time(end) / 1e9:.0f} TFLOP/s\")
"'
TAIL=22 bench frontend 210 frontend
TAIL=10 bench cache 150 cache
TAIL=13 step conv 120 python3 benchmarks/conv_variants.py --deadline 110 --per-case 20
step tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_crf.py \
    tests/test_lattice.py
step fc6 60 python3 benchmarks/profile_fc6.py --rows 8
step whole 60 python3 benchmarks/profile_fc6.py --whole --size 512 1024 --batch 8 --rows 15
bench crf_data 40 crf data
bench context 300 context
echo "done after $SECONDS s"
