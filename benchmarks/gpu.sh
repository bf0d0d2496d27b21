#!/usr/bin/env bash
# The GPU check, in under 8 minutes on one H100/H200: speed benchmarks + a short real training and pick.
# Prints one table at the end. Run from the repository root on the device machine:
#   bash benchmarks/gpu.sh
# mrcfile and starfile are not in the device image: carry them as wheels in .whl/ (see the device README):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl mrcfile starfile   (both are pure Python: py3-none-any)
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
W=${OUT:-$(mktemp -d)}
mkdir -p "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$W/gpu.txt"
t0=$(date +%s)

# 1. training step speed (full step vs pre-made tensors), bf16 AMP   [~1.5 min]
timeout 150 python3 benchmarks/train_speed.py --backbone resnet8 resnet18 --device cuda --steps 100 2>&1 | tee "$W/train_speed.txt"

# 2. pick speed: 4096² micrographs binned ×4, resnet18, vs floor and window-by-window   [~1.5 min]
timeout 150 python3 benchmarks/pick_speed.py --backbone resnet18 --device cuda --micrographs 32 2>&1 | tee "$W/pick_speed.txt"

# 3. a short real run: simulate → extract → train resnet18 → pick → evaluate   [~3 min]
R="$W/real"
python3 -m cryopick simulate "$R/sim" --micrographs 12 --size 2048 --seed 1 -q
python3 -m cryopick extract "$R/sim/micrographs.star" --coords "$R/sim/labels" --diameter 160 --out "$R/ds" \
  --truth "$R/sim/truth" -j 8 -q
ts=$(date +%s)
timeout 200 python3 -m cryopick train --data-dir "$R/ds" --exp-name gpu --output-root "$R/exp" --backbone resnet18 \
  --epochs 15 --steps-per-epoch 80 --device cuda -q 2>&1 | tail -3   # dense (the default), no count
te=$(date +%s)
timeout 60 python3 -m cryopick pick "$R/sim/micrographs.star" --model "$R/exp/gpu/checkpoints/best.pt" --out "$R/picks" \
  --device cuda -q 2>&1 | tail -3
python3 -m cryopick evaluate "$R/picks" --truth "$R/sim/truth" --radius-px 40 --json "$R/eval.json" -q | tee "$W/eval.txt"
# 4. the trained resnet18: pick's dense map vs window-by-window scoring (128-px patches and the trained context)   [~1 min]
timeout 120 python3 benchmarks/dense_vs_windows.py --model "$R/exp/gpu/checkpoints/best.pt" \
  --micrographs "$R/sim/micrographs.star" --truth "$R/sim/truth" --limit 1 --device cuda 2>&1 | tee "$W/windows.txt"

echo
echo "==================== cryopick GPU check ($(cat "$W/gpu.txt"), $(date -u +%F)) ===================="
printf '%-44s %s\n' "train step, samples/s (mode | full | pre-made | ratio):" ""
grep -E '^(resnet8|resnet18) ' "$W/train_speed.txt" | sed 's/^/    /'
printf '%-44s\n' "pick (4096² bin 4, resnet18):"
grep -E 'micrographs/s|ratio|peak' "$W/pick_speed.txt" | sed 's/^/    /'
printf '%-44s %s s\n' "real run: train resnet18, 15 × 80 dense steps:" "$((te - ts))"
printf '%-44s %s\n' "real run: evaluate vs truth:" "$(cat "$W/eval.txt")"
printf '%-44s\n' "trained resnet18, dense vs window by window:"
grep -E '^(dense|patch|trained|\|ΔAP)' "$W/windows.txt" | sed 's/^/    /'
printf '%-44s %s s\n' "total wall time:" "$(( $(date +%s) - t0 ))"
