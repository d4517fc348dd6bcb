#!/usr/bin/env bash
# One call on the lent GPU machine (the `device` tool's `run`), from the repository root; results under $OUT:
#   - bench_views: batches of 256^2 views, the per-view and the batched projector paths, their films' agreement;
#   - bench_slider: the CT2XSynth slider's update on the GPU, on the real chest.
# (bench_synth needs SimpleITK's resampling for its CT cube: its GPU figures are from the fifth stop, bench/RESULTS.md.)
# The real chest travels as bench/_work/chest.npz (`python bench/chest_npz.py` here, then `run` with
# carry=["bench/_work/chest.npz"], 37 MB of the 64 MiB a call carries). That machine has torch but neither SimpleITK
# nor vtk, and cannot install them: a stand-in SimpleITK that fails when used lets ct2x import (these benchmarks read
# no file through it), and the slider is timed without the conversion to vtkImageData (its output says so).
# Rehearse on a CPU first: DEVICE=cpu VIEWS=1,16 OUT=/tmp/gpu_out bash bench/gpu_lease.sh
set -euo pipefail
DEVICE=${DEVICE:-cuda}
VIEWS=${VIEWS:-1,16,64,256}
OUT=${OUT:?set OUT: the folder the results go to}
CHEST=bench/_work/chest.npz

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # ct2x from this checkout: nothing is installed there
if ! python -c "import SimpleITK" 2>/dev/null; then
    stand_in=$(mktemp -d)
    cat > "$stand_in/SimpleITK.py" <<'STAND_IN'
class _Missing:
    """A SimpleITK name (a constant ct2x reads at import, or a function), which fails when it is used."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"SimpleITK is not installed here: {self.name}")


def __getattr__(name):
    return _Missing(name)
STAND_IN
    export PYTHONPATH="$stand_in:$PYTHONPATH"
fi
{ nvidia-smi || true; python -c "import sys, torch; print(sys.version, torch.__version__, torch.cuda.is_available())"; } \
    > "$OUT/machine.txt" 2>&1
chest_args=()
[ -f "$CHEST" ] && chest_args=(--ct "$CHEST")

python bench/bench_views.py --device "$DEVICE" --views "$VIEWS" --repeats 5 "${chest_args[@]}" 2>&1 \
    | tee "$OUT/bench_views.txt"
if [ -f "$CHEST" ]; then
    python bench/bench_slider.py --device "$DEVICE" --repeats 5 "${chest_args[@]}" 2>&1 | tee "$OUT/bench_slider.txt"
fi
