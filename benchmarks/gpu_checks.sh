#!/usr/bin/env bash
# The GPU checks of issue 18 in one run, for a machine with an NVIDIA GPU and a CUDA build of
# torch (the development machine has none, so none of this has run on a GPU yet):
#
#   benchmarks/gpu_checks.sh OUT_DIR [DEVICE]
#
# 1. the CUDA conformance test (CUDA logits against the CPU's) and the device-recovery tests;
# 2. bench_inference.py's CUDA rows: model speed per slice, and a threshold change from the
#    cache against a full pass;
# 3. bench_volume.py's CUDA rows: 256 x 256 x 200 and 512 x 512 x 300 volumes, GPU peak memory,
#    float16 against float32;
# 4. bench_live.py: what the widget computes for each slider change, on the GPU.
#
# It needs python3 with a CUDA torch, numpy, safetensors, imageio, tifffile, tqdm, matplotlib,
# nibabel and pytest; napari and Qt are not needed. Run from anywhere; each part's output is
# printed and kept in OUT_DIR/<part>.txt. DEVICE (default cuda) = cpu runs the same steps on
# the CPU, smaller, to check the script itself on a machine without a GPU. Each part stops
# after 4 minutes and the others still run; the parts come in order of importance, since a
# lent GPU machine runs one call for at most 10 minutes (no GPU has timed the whole yet).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_checks.sh OUT_DIR [DEVICE]}
device=${2:-cuda}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

python3 - "$device" <<'PY' || exit 1
import sys, torch
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA GPU: install a CUDA build of torch, or pass DEVICE=cpu")
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, {name}")
PY

failed=()
part() {  # part NAME COMMAND...: run, print, keep; a part that fails does not stop the rest
    local name=$1
    shift
    echo "== $name: $*"
    timeout 240 "$@" 2>&1 | tee "$out/$name.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("$name")
}

if [ "$device" = cuda ]; then
    threads=$(nproc)
    part conformance python3 -m pytest -q -p no:cacheprovider --disable-warnings \
        tests/test_conformance.py tests/test_device_recovery.py
    part inference python3 benchmarks/bench_inference.py --devices cuda --skip-memory \
        --threads "$threads"
    part volume python3 benchmarks/bench_volume.py --devices cuda --threads "$threads"
    part live python3 benchmarks/bench_live.py --devices cuda --threads "$threads"
else  # a check of the script: few repeats, the smallest volumes
    part conformance python3 -m pytest -q -p no:cacheprovider --disable-warnings \
        tests/test_conformance.py -k "cuda or parameter_count"
    part inference python3 benchmarks/bench_inference.py --devices cpu --skip-memory \
        --repeats 1
    part volume python3 benchmarks/bench_volume.py --devices cpu --quick
    part live python3 benchmarks/bench_live.py --devices cpu --repeats 2
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all parts ran; outputs in $out"
