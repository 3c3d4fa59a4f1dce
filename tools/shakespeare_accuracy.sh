#!/usr/bin/env bash
# The character-level tiny-shakespeare accuracy reference (configs/shakespeare_char.json) in several
# recipes, run side by side on one GPU; metrics (JSON lines) and logs under OUT.
#   bash tools/shakespeare_accuracy.sh path/to/tinyshakespeare.txt [recipes] [extra overrides...]
# Environment: OUT (default runs/shakespeare), STEPS (default 5000), TIME_LIMIT (seconds per run, 0 = none).
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
port=29600
pids=()
for recipe in ${recipes//,/ }; do
    port=$((port + 1))
    MASTER_PORT=$port MEGAQ_IGNORE_SLURM=1 timeout "${TIME_LIMIT:-0}" python launch/pretrain_gpt.py \
        --config configs/shakespeare_char.json \
        --override quant.recipe="$recipe" --override data.path="$out/data/shakespeare" \
        --override data.tokenizer.model="$out/data/chars.json" \
        --override train.train_steps="${STEPS:-5000}" --override train.decay_steps=5000 \
        --override checkpoint.dir="$out/$recipe/checkpoints" \
        --override logging.tensorboard_dir="$out/$recipe/tensorboard" \
        --override logging.metrics_file="$out/shakespeare_$recipe.jsonl" "$@" \
        > "$out/shakespeare_$recipe.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
metrics=()
for recipe in ${recipes//,/ }; do metrics+=("$out/shakespeare_$recipe.jsonl"); done
python tools/plot_curves.py "${metrics[@]}" || status=1
exit $status
