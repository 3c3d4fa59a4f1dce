#!/usr/bin/env bash
# The character-level tiny-shakespeare accuracy reference (configs/shakespeare_char.json) in several
# recipes, run side by side on one GPU; metrics (JSON lines) and logs under OUT.
#   bash tools/shakespeare_accuracy.sh path/to/tinyshakespeare.txt [recipes] [extra overrides...]
# Environment: OUT (default runs/shakespeare), STEPS (default 5000), TIME_LIMIT (seconds per run, 0 = none),
# PORT_BASE (default 29600).
set -uo pipefail
cd "$(dirname "$0")/.."
text=${1:?usage: shakespeare_accuracy.sh TINYSHAKESPEARE.txt [recipes] [overrides...]}
recipes=${2:-bf16,int8,int4}
shift $(( $# >= 2 ? 2 : 1 ))
out=${OUT:-runs/shakespeare}
mkdir -p "$out/data"
python tools/train_tokenizer.py --type char --input "$text" --output "$out/data/chars.json" || exit 1
python tools/preprocess_data.py --input "$text" --whole-file --tokenizer-type char --workers 1 --no-progress \
    --tokenizer-model "$out/data/chars.json" --output-prefix "$out/data/shakespeare" || exit 1
source tools/lib/side_by_side.sh
run_side_by_side shakespeare configs/shakespeare_char.json "${PORT_BASE:-29600}" "$recipes" \
    --override data.path="$out/data/shakespeare" --override data.tokenizer.model="$out/data/chars.json" \
    --override train.train_steps="${STEPS:-5000}" --override train.decay_steps=5000 "$@"
status=$side_by_side_status
[ ${#side_by_side_metrics[@]} -gt 0 ] && { python tools/plot_curves.py "${side_by_side_metrics[@]}" || status=1; }
exit $status
