#!/usr/bin/env bash
# Parity and speed on a borrowed NVIDIA GPU, side by side with the PyTorch reference, in one run
# (shared/notes/gpu-machine.md). `prepare` (15 MiB under gpu/) and the parity part were checked on
# lavapipe; the run on a real GPU has not happened yet.
#
#   bash tools/gpu_check.sh prepare   # here: release build, Vulkan loader libraries, reference scripts -> gpu/
#   BASE=<rev> bash tools/gpu_check.sh prepare   # also a baseline binary built from <rev> (gpu/sddpm-gpu-base),
#                                                # timed beside the new one in the speed section
#   bash tools/gpu_check.sh run       # there (device tool, carry ["gpu"]): prints one report
#   PARITY_ONLY=1 bash tools/gpu_check.sh run   # adapter and parity only
#   QUICK=1 bash tools/gpu_check.sh run         # every section at toy sizes (tiny, batch 2, torch on
#                                               # CPU): checks the script itself on lavapipe
#   bash tools/gpu_check.sh model     # here, no GPU or gpu/ needed: the GPU model beside a
#                                     # lavapipe trace (the pairing and tables `run` prints)
#
# The speed section prints, after each measured profile, the GPU model's estimate of the same
# dispatches on the same variants beside the measured times, per kernel and per kernel kind
# (`profile --dry-run --gpu-model M --compare-trace`, src/gpu_model.rs): the first GPU session
# calibrates the model's efficiencies from it. M is GPU_MODEL, else guessed from nvidia-smi.
set -euo pipefail
cd "$(dirname "$0")/.."
G=gpu

prepare() {
    cargo build --release
    rm -rf "$G" && mkdir -p "$G/debs" "$G/root" "$G/ref"
    cp target/release/sddpm-gpu "$G/"
    if [ -n "${BASE:-}" ]; then
        # The baseline builds in a worktree of its own, reusing this checkout's compiled dependencies.
        wt=$(mktemp -d)/base
        git worktree add --detach "$wt" "$BASE"
        [ -d "$wt/target" ] || cp -a target "$wt/target"
        (cd "$wt" && cargo build --release)
        cp "$wt/target/release/sddpm-gpu" "$G/sddpm-gpu-base"
        git worktree remove --force "$wt"
    fi
    cp ../shared/reference/sddpm_ref.py ../shared/reference/bench_torch.py "$G/ref/"
    # The GPU machine has the NVIDIA driver but no Vulkan loader.
    (cd "$G/debs" && apt-get download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
    for d in "$G"/debs/*.deb; do dpkg -x "$d" "$G/root"; done
    rm -rf "$G/debs"
    du -sh "$G"
}

# The GPU model $2 (an estimate) beside the measured trace $1 that `profile --trace` wrote for
# the profile arguments that follow (the same net: preset, batch, size, --train).
model_beside() {
    local t=$1 m=$2; shift 2
    "$B" profile --dry-run --gpu-model "$m" "$@" --compare-trace "$t"
}

model() {
    B="$PWD/target/release/sddpm-gpu"
    [ -x "$B" ] || cargo build --release
    O="${OUT:-$(mktemp -d)}"
    local net=(--preset tiny --batch 2 --size 16)
    for train in "" --train; do
        "$B" profile "${net[@]}" $train --iters 2 --trace "$O/trace$train.json" | grep -E "^total"
        model_beside "$O/trace$train.json" "${GPU_MODEL:-h100}" "${net[@]}" $train
    done
}

run() {
    export LD_LIBRARY_PATH="$PWD/$G/root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
    export WGPU_BACKEND=vulkan
    if [ -z "${VK_DRIVER_FILES:-}" ]; then
        icd=$(ls /usr/local/nvidia/share/vulkan/icd.d/*.json /usr/share/vulkan/icd.d/nvidia*.json /etc/vulkan/icd.d/nvidia*.json 2>/dev/null | head -1 || true)
        [ -n "$icd" ] && export VK_DRIVER_FILES="$icd"
    fi
    B="$PWD/$G/sddpm-gpu"
    O="${OUT:-/tmp}"
    echo "== adapter, measured fp32 FMA rate and copy bandwidth"; "$B" devices --bench
    # Tuning cache of this run only (the first profile below tunes every kernel shape and says so).
    export SDDPM_CACHE_DIR="$O/tune-cache"
    echo "== parity (GPU numerics differ from lavapipe: FMA, reduction order)"
    # The base fixtures, spiking self-attention (both kernel forms in attn2-t8) and LIF neurons.
    for f in fixtures fixtures-attn fixtures-lif fixtures-attn2-t8; do
        D=tests/$f
        thr=$(python3 -c "from safetensors.torch import load_file; print(float(load_file('$D/forward.safetensors')['threshold'][0]))")
        "$B" forward --checkpoint $D/weights.safetensors --input $D/forward.safetensors --output "$O/eps.safetensors"
        "$B" forward --checkpoint $D/weights.safetensors --input $D/forward.safetensors --output "$O/eps_thr.safetensors" --threshold "$thr"
        "$B" train-step --checkpoint $D/weights.safetensors --input $D/train_step.safetensors --output "$O/after.safetensors"
        python3 - "$O" "$D" <<'PY'
import sys, torch
from safetensors.torch import load_file
o, d = sys.argv[1:3]
ref = load_file(f"{d}/forward.safetensors"); ts = load_file(f"{d}/train_step.safetensors")
rel = lambda a, b: float((a - b).norm() / b.norm())
print(d, "eps rel L2", rel(load_file(f"{o}/eps.safetensors")["eps"], ref["eps"]))
print(d, "eps_threshold rel L2", rel(load_file(f"{o}/eps_thr.safetensors")["eps"], ref["eps_threshold"]))
after = load_file(f"{o}/after.safetensors")
w = "downblocks.0.conv1.weight"; g = ts[f"grad.{w}"].abs() >= 1e-5
print(d, "train-step", w, "max |diff| where grad is not ~0:", float((after[w] - ts[f"after.{w}"])[g].abs().max()))
PY
    done
    [ -n "${PARITY_ONLY:-}" ] && return 0
    echo "== kernel variants chosen by the tuner (every candidate's time is in the cache file)"
    if [ -n "${QUICK:-}" ]; then
        presets=(tiny); batches=(2); dev=cpu; size=(--size 16); runs=(1 1 1); tunenet=(--preset tiny --batch 2)
    else
        presets=(tiny small cifar10); batches=(8 32); dev=cuda; size=(); runs=(5 3 10); tunenet=(--preset cifar10 --batch 8)
    fi
    "$B" profile "${tunenet[@]}" "${size[@]}" --iters 1 --train | grep -E "^(total|peak)|@"
    python3 - "$SDDPM_CACHE_DIR" <<'PY'
import json, pathlib, sys
for f in pathlib.Path(sys.argv[1]).glob("tune-*.json"):
    c = json.loads(f.read_text())
    print(f.name, "peak", c.get("peak"))
    for key, e in c["shapes"].items():
        print(f"  {e['choice']:>8}  " + "  ".join(f"{t['variant']} {t['us']:.1f}us" for t in e["candidates"]) + f"  {key[:90]}")
PY
    M="${GPU_MODEL:-}"
    if [ -z "$M" ]; then
        case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" in
            *H200*) M=h200 ;; *A100*) M=a100 ;; *4090*) M=rtx4090 ;; *) M=h100 ;;
        esac
    fi
    echo "== speed: sddpm-gpu (GPU timestamps; the baseline binary too if prepared) and PyTorch on the same card; GPU model $M beside sddpm-gpu's"
    bins=("$B"); [ -x "$G/sddpm-gpu-base" ] && bins+=("$PWD/$G/sddpm-gpu-base")
    for p in "${presets[@]}"; do
        for bs in "${batches[@]}"; do
            for b in "${bins[@]}"; do
                echo "-- $(basename "$b") $p batch $bs"
                # The new binary's dispatches also go to traces, for the GPU model below.
                te=(); tt=(); [ "$b" = "$B" ] && te=(--trace "$O/trace-$p-$bs.json") && tt=(--trace "$O/trace-$p-$bs-train.json")
                "$b" profile --preset "$p" --batch "$bs" "${size[@]}" --iters "${runs[0]}" "${te[@]}" | grep -E "^(total|conv::)"
                "$b" profile --preset "$p" --batch "$bs" "${size[@]}" --iters "${runs[1]}" --train "${tt[@]}" | grep -E "^(total|conv::)"
            done
            echo "-- GPU model $M (estimates) beside the measured sddpm-gpu dispatches above, $p batch $bs"
            model_beside "$O/trace-$p-$bs.json" "$M" --preset "$p" --batch "$bs" "${size[@]}"
            model_beside "$O/trace-$p-$bs-train.json" "$M" --preset "$p" --batch "$bs" "${size[@]}" --train
            [ "$p" = small ] && "$B" profile --preset small --attn 1 --batch "$bs" --iters 5 | grep -E "^(total|spike_attention|conv::conv2d)"
            for tf in off on; do python3 "$G/ref/bench_torch.py" --device "$dev" --preset "$p" --batch "$bs" --tf32 "$tf" --iters "${runs[2]}"; done
        done
    done
}

"${1:?usage: tools/gpu_check.sh prepare|run|model}"
