#!/usr/bin/env bash
# Run every bench script one after another, then write docs/benchmarks.md (bench/report.py).
#
#   bench/run_all.sh                 # quick: fewer repetitions, galleries up to 100k, a tiny
#                                    #   noise-filter run (about 30 min on 2 cores)
#   bench/run_all.sh --full          # full settings, 1M gallery, base preset (an hour or more)
#   bench/run_all.sh --only two_stream_vs_cross,index_bench
#   bench/run_all.sh --report-only   # just rebuild the report from bench/results/*.json
#
# A failing script is reported at the end and does not stop the others; its figure stays
# "not run yet" (or keeps its previous JSON) in the report. Environment: PYTHON (default
# python), DATA (the Open Clip Art dataset for noise_filter and embed_gallery; skipped when
# absent), BUNDLE (a bundle for embed_gallery and the realistic-gallery benches; skipped when
# unset). The realistic benches model the real galleries openclipart, emoji and synthetic
# embedded by BUNDLE under cots-data/real-embeddings/ (built once, with their datasets when
# absent; delete that folder after changing BUNDLE). gpu_train runs when torch sees a CUDA
# device.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DATA=${DATA:-cots-data/datasets/openclipart}
MODE=quick
ONLY=""
REPORT_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --full) MODE=full ;;
    --only) ONLY=",$2,"; shift ;;
    --report-only) REPORT_ONLY=1 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run_all.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

FAILED=()
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

wanted() {  # wanted NAME: whether --only (if given) names NAME
  [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]
}

bench() {  # bench NAME ARGS...: python -m bench.NAME ARGS unless --only excludes it
  local name=$1; shift
  if ! wanted "$name"; then return 0; fi
  echo "== $name ($MODE): $PYTHON -m bench.$name $*"
  local start=$SECONDS
  if "$PYTHON" -m "bench.$name" "$@"; then
    echo "== $name done in $((SECONDS - start)) s"
  else
    echo "== $name FAILED (exit $?) after $((SECONDS - start)) s" >&2
    FAILED+=("$name")
  fi
}

noise_filter() {  # writes under its --out directory; the report reads bench/results/
  if [ ! -f "$DATA/manifest.jsonl" ]; then
    echo "== noise_filter skipped: no dataset at $DATA (build it with: cots data openclipart)"
    return 0
  fi
  bench noise_filter --data "$DATA" --out "$WORK/noise-filter" "$@" \
    && [ -f "$WORK/noise-filter/noise_filter.json" ] \
    && cp "$WORK/noise-filter/noise_filter.json" bench/results/noise_filter.json
}

embed_gallery() {
  if [ -z "${BUNDLE:-}" ] || [ ! -f "$DATA/manifest.jsonl" ]; then
    echo "== embed_gallery skipped: set BUNDLE and DATA (a bundle from cots export, a gallery)"
    return 0
  fi
  bench embed_gallery --bundle "$BUNDLE" --data "$DATA" "$@"
}

REAL=(cots-data/real-embeddings/openclipart cots-data/real-embeddings/emoji
      cots-data/real-embeddings/synthetic)

real_embeddings() {  # embed each real gallery of REAL with BUNDLE once, building it if absent
  local root name count
  for root in "${REAL[@]}"; do
    name=$(basename "$root")
    [ -f "$root/CURRENT" ] && continue
    if [ ! -f "cots-data/datasets/$name/manifest.jsonl" ]; then
      count=(); [ "$name" = synthetic ] && count=(--count 5000)
      "$PYTHON" -m index_builder.cli data "$name" "${count[@]}" || return 1
    fi
    "$PYTHON" -m index_builder.cli index build --bundle "$BUNDLE" \
      --data "cots-data/datasets/$name" --out "$root" --factory Flat || return 1
  done
}

realistic() {  # realistic NAME ARGS...: bench NAME on the model of the real embeddings
  local name=$1; shift
  if ! wanted "$name"; then return 0; fi
  if [ -z "${BUNDLE:-}" ]; then
    echo "== $name (realistic) skipped: set BUNDLE (a bundle from cots export)"
    return 0
  fi
  if ! real_embeddings; then
    echo "== $name (realistic) FAILED: could not embed the real galleries" >&2
    FAILED+=("$name")
    return 0
  fi
  bench "$name" --real "${REAL[@]}" "$@"
}

gpu_train() {
  if ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "== gpu_train skipped: no CUDA device"
    return 0
  fi
  bench gpu_train --device cuda "$@"
}

if [ "$REPORT_ONLY" = 0 ]; then
  mkdir -p bench/results
  if [ "$MODE" = quick ]; then
    bench two_stream_vs_cross --presets tiny,lite
    bench embed_throughput --preset lite --images 64 --captions 512
    bench index_bench --sizes 10000 100000 --queries 500
    bench train_throughput --preset lite --steps 2
    bench objective_cost --preset tiny
    bench service_load --demo-images 2000 --requests 200 --max-seconds 10
    realistic realistic_gallery --size 100000
    realistic realistic_index --size 100000 --queries 500 --single 100
    realistic service_load --bundle "${BUNDLE:-}" --realistic-gallery 100000 --requests 200 \
      --max-seconds 10 --out bench/results/service_load-realistic.json
    bench soak --minutes 1
    bench video_bench --home "$WORK/video" --count 200
    bench backends --size 100000 --queries 100 --filtered 10
    bench filter_columns --rows 100000
    noise_filter --set model.preset=tiny --steps 50
    embed_gallery --limit 1000 --repeats 2
    gpu_train --presets lite --steps 5
  else
    bench two_stream_vs_cross --presets tiny,lite,base --sample-images 64 --reps 7
    bench embed_throughput --preset lite
    bench index_bench --sizes 10000 100000 1000000
    bench train_throughput --preset lite
    bench objective_cost --preset tiny
    bench objective_cost --base training/recipes/ablation/cpu.yaml --preset "" --queue 1024
    bench service_load --demo-images 2000 --requests 400
    realistic realistic_gallery --size 1000000
    realistic realistic_index --size 1000000
    realistic service_load --bundle "${BUNDLE:-}" --realistic-gallery 1000000 --requests 400 \
      --ready-seconds 300 --out bench/results/service_load-1m-realistic.json
    bench soak --minutes 10
    bench video_bench --home "$WORK/video" --count 400
    bench backends --size 100000 --threads 2
    bench filter_columns --rows 1000000
    noise_filter --lam 2 --lam 1 --lam 0.5
    embed_gallery --captions
    gpu_train
  fi
fi

"$PYTHON" -m bench.report || FAILED+=("report")
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed: ${FAILED[*]}" >&2
  exit 1
fi
