#!/usr/bin/env bash
# The GPU check, in under 8 minutes on one H100/H200: speed benchmarks + a short real training and pick.
# Prints one table at the end. Run from the repository root on the device machine:
#   bash benchmarks/gpu.sh
# mrcfile and starfile are not in the device image: carry them as wheels in .whl/ (see the device README):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl mrcfile starfile   (both are pure Python: py3-none-any)
# SMOKE=1 runs every step tiny on the CPU (a dry run of this script before spending device time on it).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; TS="--backbone resnet8 --steps 2"; PS="--quick --windows 64"; SIM="--micrographs 3 --size 1024"
  TR="--epochs 1 --steps-per-epoch 2 --batch-size 5"; DW="--limit 1 --crop 8"
else
  DEV=cuda; TS="--backbone resnet8 resnet18 --steps 60"; PS="--micrographs 16"; SIM="--micrographs 12 --size 2048"
  TR="--epochs 10 --steps-per-epoch 60"; DW="--limit 2 --crop 1024"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
W=${OUT:-$(mktemp -d)}
mkdir -p "$W"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU ($DEV)"; } | tee "$W/gpu.txt"
t0=$(date +%s)

# 1. training step speed (full step vs pre-made tensors), bf16 AMP   [~1.5 min]
timeout 90 python3 benchmarks/train_speed.py $TS --device $DEV 2>&1 | tee "$W/train_speed.txt"

# 2. pick speed: 4096² micrographs binned ×4, resnet18, vs floor and window-by-window   [~1.5 min]
timeout 90 python3 benchmarks/pick_speed.py --backbone resnet18 --device $DEV $PS 2>&1 | tee "$W/pick_speed.txt"
# 2b. the same with 8 loader threads: on a GPU node reading + preprocessing, not the forward, bounds picking   [~0.5 min]
timeout 60 python3 benchmarks/pick_speed.py --backbone resnet18 --device $DEV $PS --workers 8 --windows 64 2>&1 \
  | tee "$W/pick_speed_w8.txt"

# 3. a short real run: simulate → extract → train resnet18 → pick → evaluate   [~3 min]
R=$(mktemp -d)  # not under $OUT: only a few files come back from there
python3 -m cryopick simulate "$R/sim" $SIM --seed 1 -q
python3 -m cryopick extract "$R/sim/micrographs.star" --coords "$R/sim/labels" --diameter 160 --out "$R/ds" \
  --truth "$R/sim/truth" -j 8 -q
ts=$(date +%s)
timeout 150 python3 -m cryopick train --data-dir "$R/ds" --exp-name gpu --output-root "$R/exp" --backbone resnet18 \
  $TR --device $DEV -q 2>&1 | tail -4   # dense (the default), no count
te=$(date +%s)
cp "$R/exp/gpu/metrics.csv" "$W/train_metrics.csv" 2>/dev/null
timeout 60 python3 -m cryopick pick "$R/sim/micrographs.star" --model "$R/exp/gpu/checkpoints/best.pt" --out "$R/picks" \
  --device $DEV -q 2>&1 | tail -3
python3 -m cryopick evaluate "$R/picks" --truth "$R/sim/truth" --radius-px 40 --json "$R/eval.json" -q | tee "$W/eval.txt"
# 4. the trained resnet18: pick's dense map vs window-by-window scoring (128-px patches and the trained context)   [~1 min]
timeout 100 python3 benchmarks/dense_vs_windows.py --model "$R/exp/gpu/checkpoints/best.pt" \
  --micrographs "$R/sim/micrographs.star" --truth "$R/sim/truth" $DW --device $DEV 2>&1 | tee "$W/windows.txt"

echo
echo "==================== cryopick GPU check ($(cat "$W/gpu.txt"), $(date -u +%F)) ===================="
printf '%-44s %s\n' "train step, samples/s (mode | full | pre-made | ratio):" ""
grep -E '^(resnet8|resnet18) ' "$W/train_speed.txt" | sed 's/^/    /'
printf '%-44s\n' "pick (4096² bin 4, resnet18):"
grep -E 'micrographs/s|ratio|peak|context cost|/ floor' "$W/pick_speed.txt" | sed 's/^/    /'
printf '%-44s\n' "pick with --workers 8:"
grep -E '^(pick|floor) ' "$W/pick_speed_w8.txt" | sed 's/^/    /'
printf '%-44s %s s\n' "real run: train resnet18 ($TR):" "$((te - ts))"
printf '%-44s %s\n' "real run: evaluate vs truth:" "$(cat "$W/eval.txt")"
printf '%-44s\n' "trained resnet18, dense vs window by window:"
grep -E '^(dense|patch|trained|\|ΔAP)' "$W/windows.txt" | sed 's/^/    /'
printf '%-44s %s s\n' "total wall time:" "$(( $(date +%s) - t0 ))"
