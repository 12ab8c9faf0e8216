#!/usr/bin/env bash
# Issues 13 and 17 on one H200, in ONE device call that stops itself before its deadline and packs what finished.
#
# Prepare here, in the repository root (not on the GPU machine), once:
#   ../shared/gpu/fetch-wheels.sh .whl                                    # fastai & co. (.whl/ is git-ignored)
#   python3 ../shared/gpu/pack-artworks.py train .gpu-train --max-mib 50  # 5,311 real paintings, WebP + train.csv
#   du -sh --exclude=.git .                                               # what travels must stay under 64 MiB
# .gpu-train/ is not git-ignored (never commit it): or pack into .gpu/train (ignored) and run with
# GPU_DATA=.gpu/train, carrying ".gpu/train" instead.
#
# Call (the device tool's `run`; the command runs in the repository root there):
#   command:   GPU_RUN_SECONDS=540 bash examples/gpu_run.sh
#   carry:     [".whl", ".gpu-train"]
#   timeout_s: 600            (GPU_RUN_SECONDS must stay below the call's limit_s; 60 s are left for slack)
# Then unpack here (files_at is in the reply):
#   mkdir -p docs/results/gpu && tar -xzf <files_at>/results.tar.gz -C docs/results/gpu
#   cp <files_at>/bench-bs*.txt docs/results/bench/   (step 0's raw output: rename to gpu-r50-288px-bf16-bs*.txt)
#
# Priorities, each writing its results as it finishes (a step past the deadline is stopped; complete folds stay):
#   0. issue 13's pipeline benchmark: whole epochs of the device pipeline against the model-only time and the plain
#      torchvision loop, ResNet-50 at 288 px, bf16, channels-last, batch 64 then 128 (benchmarks/bench.py --epochs;
#      the first also times the model-only ceiling with and without compile=True); raw output in $OUT/bench-bs{64,128}.txt
#   1. the reference recipe on the full training set: ResNet-50, 288 px, bs 32, 30 epochs, 4 folds (run_kfold.py)
#   2. the same with --preset best
#   3. fold 0 of the study's other cells (resnet34, resnet101, 224, 320, gem; study.py reuses 1 and 2 as cells)
# Then $OUT/results.tar.gz (config.json, summary.json, meta.json, fold*/history.csv, fold*/oof.csv, *.png,
# results.csv/md; never weights or images) and $OUT/gpu_run.log come back.
# Knobs (environment): BENCH_EPOCHS (3; 0 skips step 0), BENCH_IMAGES (0 = all), BENCH_PRECISION (bf16),
# GPU_RUN_SECONDS (540), GPU_DATA (.gpu-train), GPU_RUNS (runs/gpu), EPOCHS (30), BS (32),
# ARCH (resnet50), SIZE (288), GPU_CELL_SECONDS (180), GPU_SITE (/tmp/site). GPU_RUN_CPU_SMOKE=1 skips the CUDA
# check: a CPU rehearsal with tiny settings (ARCH=resnet18 SIZE=32 EPOCHS=3 GPU_DATA=<small folder>).
set -uo pipefail

START=$(date +%s)
TOTAL=${GPU_RUN_SECONDS:-540}
RESERVE=30        # seconds kept for the summary and the tarball
MIN_STEP=60       # no step starts with less than this left
CELL=${GPU_CELL_SECONDS:-180}  # the study starts no new cell later than this before the deadline (one fold-0 cell)
DATA=${GPU_DATA:-.gpu-train}
RUNS=${GPU_RUNS:-runs/gpu}
STUDY=$RUNS/study
EPOCHS=${EPOCHS:-30}
BS=${BS:-32}
ARCH=${ARCH:-resnet50}
SIZE=${SIZE:-288}
SITE=${GPU_SITE:-/tmp/site}
OUT=${OUT:-/tmp/gpu_run_out}
LOG=$OUT/gpu_run.log
mkdir -p "$OUT" "$STUDY"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONWARNINGS=ignore

say() { echo "[gpu_run $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( START + TOTAL - RESERVE - $(date +%s) )); }

run_step() {  # run_step NAME CMD...: run CMD under the time left; a stopped step keeps its complete folds
  local name=$1 budget rc
  shift
  budget=$(left)
  if (( budget < MIN_STEP )); then
    say "$name: skipped, only ${budget}s left before the deadline"
    return 1
  fi
  say "$name: starting with ${budget}s left: $*"
  timeout -k 20 "$budget" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if (( rc == 124 || rc == 137 )); then
    say "$name: stopped at the deadline (rc $rc); complete folds are kept, the fold in progress is lost"
  else
    say "$name: finished, rc $rc"
  fi
  return 0
}

summarize() {  # per run directory: complete folds, best valid accuracy per fold, out-of-fold scores
  python3 - "$@" <<'EOF' 2>&1 | tee -a "$LOG"
import sys
import artlearn as al
for path in sys.argv[1:]:
    try:
        run = al.load_run(path)
    except ValueError as e:
        print(f"{path}: {e}")
        continue
    best = run.best
    accs = " ".join(f"{k}:{v:.4f}" for k, v in best["valid_acc"].items()) if "valid_acc" in best else "-"
    secs = sum(float(h["seconds"].sum()) for h in run.histories.values())
    print(f"{path}: complete folds {run.folds}, best valid_acc {accs}, oof {run.oof_scores}, "
          f"{secs / 60:.1f} min of epochs")
EOF
}

pack() {  # the small result files only, never weights or images
  local tarball=$OUT/results.tar.gz
  local names=(-name config.json -o -name summary.json -o -name meta.json -o -name history.csv -o -name '*.png'
               -o -name results.csv -o -name results.md)
  (cd "$RUNS" && find . -type f \( "${names[@]}" -o -path './*/fold*/oof.csv' \) -print0 |
     tar --null -T - -czf "$tarball")
  if (( $(stat -c %s "$tarball") > 15 * 1024 * 1024 )); then  # $OUT files come back up to 16 MiB each
    say "results.tar.gz over 15 MiB: packed again without the oof.csv files"
    (cd "$RUNS" && find . -type f \( "${names[@]}" \) -print0 | tar --null -T - -czf "$tarball")
  fi
  say "packed $(tar -tzf "$tarball" | wc -l) files, $(du -h "$tarball" | cut -f1), into $tarball"
}

# ---------------------------------------------------------------- environment
if ! ls .whl/*.whl >/dev/null 2>&1 || [[ ! -f $DATA/train.csv ]]; then
  say "missing .whl/*.whl or $DATA/train.csv: prepare them as the comment at the top says, and carry them"
  exit 2
fi
if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/*.whl 2>&1 | tail -3 | tee -a "$LOG"; then
  say "pip could not install .whl/*.whl into $SITE; nothing trained"
  exit 3
fi
export PYTHONPATH=$SITE:$PWD
CHECK="import fastai.vision.all, sklearn, matplotlib, artlearn, torch"
[[ ${GPU_RUN_CPU_SMOKE:-0} == 1 ]] || CHECK="$CHECK; assert torch.cuda.is_available(), 'no CUDA device'"
if ! python3 -c "$CHECK" 2>&1 | tail -3 | tee -a "$LOG"; then
  say "the environment is not usable (above); nothing trained"
  exit 3
fi
python3 -c "import torch, fastai; print('torch', torch.__version__, 'fastai', fastai.__version__, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')" 2>&1 | tee -a "$LOG"
say "data: $DATA ($(( $(wc -l < "$DATA/train.csv") - 1 )) images); runs in $RUNS; deadline ${TOTAL}s"

# ---------------------------------------------------------------- 0 (issue 13), 1, 2, 3
BENCH_EPOCHS=${BENCH_EPOCHS:-3}
if (( BENCH_EPOCHS > 0 )); then
  for bs in 64 128; do
    extra=()
    (( bs == 64 )) && extra=(--compile)
    run_step "0 bench bs $bs" env OUT_FILE="$OUT/bench-bs$bs.txt" \
      bash -c 'python3 examples/benchmarks/bench.py "$@" 2>&1 | tee "$OUT_FILE"' bench \
      --data "$DATA" --images "${BENCH_IMAGES:-0}" --arch "$ARCH" --size "$SIZE" --bs "$bs" \
      --precision "${BENCH_PRECISION:-bf16}" --epochs "$BENCH_EPOCHS" --pipelines device "${extra[@]}"
  done
fi
RECIPE=(--data "$DATA" --arch "$ARCH" --size "$SIZE" --bs "$BS" --epochs "$EPOCHS" --n-folds 4 --seed 42 --no-progress)
run_step "1 reference" python3 examples/run_kfold.py "${RECIPE[@]}" --preset reference \
  --out "$STUDY/reference-$ARCH-$SIZE-avg"  # the study's name for its base cell, so step 3 reuses it
summarize "$STUDY/reference-$ARCH-$SIZE-avg"
run_step "2 best" python3 examples/run_kfold.py "${RECIPE[@]}" --preset best --out "$STUDY/best-$ARCH-$SIZE-avg"
summarize "$STUDY/best-$ARCH-$SIZE-avg"
# budget 0 (too little time for a cell) still writes the study's table and figures from the finished runs
minutes=$(awk -v s="$(left)" -v c="$CELL" 'BEGIN { m = (s - c) / 60; printf "%.2f", (m > 0 ? m : 0) }')
run_step "3 study fold 0" python3 examples/study.py --data "$DATA" --out "$STUDY" --grids arch,size,pool,preset \
  --folds 0 --n-folds 4 --seed 42 --arch "$ARCH" --size "$SIZE" --bs "$BS" --epochs "$EPOCHS" --no-progress \
  --budget-minutes "$minutes"

# ---------------------------------------------------------------- results
summarize "$STUDY"/*/
[[ -f $STUDY/results.md ]] && cat "$STUDY/results.md" | tee -a "$LOG"
pack
say "done in $(( $(date +%s) - START ))s"
