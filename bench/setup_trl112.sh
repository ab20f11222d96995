#!/usr/bin/env bash
# The peer for bench/ppo_vs_trl.py: TRL 1.12.0, the last release with PPOTrainer (trl.experimental.ppo; removed
# in PR #7020), in its own venv so it never touches the project's pins (trl 1.16). torch 2.13.0 is the CPU wheel
# the project uses (cached locally); pip resolves the rest (measured: transformers 5.23.0, accelerate 1.15.0,
# datasets 5.2.0, peft 0.21.2).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=bench/out/venv-trl112
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q torch==2.13.0 trl==1.12.0 peft==0.21.2
"$VENV/bin/python" -c "import trl, transformers, torch, peft; from trl.experimental.ppo import PPOTrainer; \
print('trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, 'peft', peft.__version__)"
