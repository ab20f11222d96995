# Sourced by bench/gpu_look.sh and bench/gpu_rm.sh (needs ART, RUN, BASE_META; BASE_CONFIG optional).
# import_base LOG: imports the base into $ART/$RUN/base again (SmolLM2: from the GGUF) and prints one line saying
# whether its weights are, byte for byte, those of the base in $BASE_META/manifest.json (the development machine's,
# the one the SFT model or the earlier RM runs were trained from). Returns 1 when they are not.
import_base() {
  python3 -m alignment.cli -q run base -c "${BASE_CONFIG:-configs/smollm2/base.yaml}" --artifacts "$ART" --run "$RUN" \
    >"$1" 2>&1 || { echo "base FAILED: $(tail -n 1 "$1")"; return 1; }
  local want have
  want=$(python3 -c "import json, sys
print([o['sha256'] for o in json.load(open(sys.argv[1]))['outputs'] if o['path'] == 'model/model.safetensors'][0])" \
    "$BASE_META/manifest.json")
  have=$(sha256sum "$ART/$RUN/base/model/model.safetensors" | cut -d' ' -f1)
  if [ "$want" = "$have" ]; then  # its own manifest stays (timings differ); the weights are what matter
    echo "base: the same weights as the development base"
  else
    echo "base: weights DIFFER from the development base ($have, want $want)"; return 1
  fi
}
