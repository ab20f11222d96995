#!/usr/bin/env bash
# Reward-model seeds on a lent GPU (docs/reward.md "Next look"), beside a look (`RM_OVERRIDES=... bash
# bench/gpu_lease.sh start ...`: waits for the look's base import) or alone (`bash bench/gpu_lease.sh rm`: with
# BASE_META set, imports the base itself and reports whether it is that manifest's). Trains seeds 0, 1, 2 of RM_CONFIG
# from that base at once with the given overrides, then scores each one on its own training pairs per kind
# (bench/rm_train_fit.py). Writes to OUT_DIR: rm_base.txt (alone: the import's line), rm_sN.log, rm_sN.json (the
# run's metrics.json) and rm_fit_sN.json, each as soon as it exists, and rm_done once every seed has ended.
#
#   ART=/work/art/D0 RUN=smollm2 [BASE_META=.dev/basemeta] bash bench/gpu_rm.sh OUT_DIR "key=value ..."
#   RM_CONFIG (configs/smollm2/reward.yaml), RM_FIT_KINDS (the four lexical kinds and json_format), BASE_CONFIG
set -u
OUT=${1:?OUT_DIR}; OVERRIDES=${2:-}; ART=${ART:-/work/art/D0}; RUN=${RUN:-smollm2}
CONFIG=${RM_CONFIG:-configs/smollm2/reward.yaml}
KINDS=${RM_FIT_KINDS:-forbidden_words,keyword,letter_frequency,min_words,json_format}
export ALIGN_TRACKING=none HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
base=$ART/$RUN/base
if [ -n "${BASE_META:-}" ]; then  # alone: no look imports the base for it
  . "$(dirname "$0")/gpu_base.sh"
  import_base "$OUT/rm_base.log" >"$OUT/rm_base.txt"  # a differing base is reported there, not fatal (gpu_look.sh's rule)
  grep -q "^base FAILED" "$OUT/rm_base.txt" && { cp "$OUT/rm_base.txt" "$OUT/rm.err"; touch "$OUT/rm_done"; exit 1; }
fi
for _ in $(seq 600); do [ -f "$base/manifest.json" ] && break; sleep 2; done
[ -f "$base/manifest.json" ] || { echo "gpu_rm.sh: no base artifact at $base after 20 minutes" >"$OUT/rm.err"; touch "$OUT/rm_done"; exit 1; }
seed() {
  local s=$1 art=$ART/rm$1/reward
  # shellcheck disable=SC2086  # one argument per override
  python3 -m alignment.cli -q run reward -c "$CONFIG" --artifacts "$ART" --run "rm$s" seed="$s" \
    inputs.base="$base" $OVERRIDES >"$OUT/rm_s$s.log" 2>&1 && cp "$art/metrics.json" "$OUT/rm_s$s.json" || return 1
  train=$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['data']['train'])" "$art/config.yaml")
  python3 bench/rm_train_fit.py "$art/model" "$train" "$KINDS" >"$OUT/rm_fit_s$s.json" 2>>"$OUT/rm_s$s.log"
}
for s in 0 1 2; do seed "$s" & done
wait
touch "$OUT/rm_done"
