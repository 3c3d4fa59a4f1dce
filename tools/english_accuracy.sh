#!/usr/bin/env bash
# English accuracy reference (configs/wikitext_gpt2.json): an 8k sentencepiece BPE tokenizer trained on
# TRAIN.txt, a GPT-2 124M-shaped model trained on TRAIN.txt and validated on all of VALID.txt, in several
# recipes side by side on one GPU; then the loss curves (OUT/english_curves.png) and the validation table.
#   bash tools/english_accuracy.sh wikitext2-valid.txt wikitext2-test.txt [recipes] [extra overrides...]
# Environment: OUT (default runs/english), STEPS (default: the config's 400), TIME_LIMIT (seconds per run,
# 0 = none), VOCAB (default 8000), PORT_BASE (default 29650), REUSE_DATA=1 (keep OUT/data's tokenizer and
# datasets when they exist, e.g. prepared on another machine).
set -uo pipefail
cd "$(dirname "$0")/.."
train_text=${1:?usage: english_accuracy.sh TRAIN.txt VALID.txt [recipes] [overrides...]}
valid_text=${2:?usage: english_accuracy.sh TRAIN.txt VALID.txt [recipes] [overrides...]}
recipes=${3:-bf16,int8,int4}
shift $(( $# >= 3 ? 3 : 2 ))
out=${OUT:-runs/english}
steps=${STEPS:-400}
mkdir -p "$out/data"
prepared() { [ -s "$out/data/spm.model" ] && ls "$out"/data/train*.bin "$out"/data/valid*.bin > /dev/null 2>&1; }
if [ "${REUSE_DATA:-0}" = 1 ] && prepared; then
    echo "english_accuracy: reusing the tokenizer and datasets in $out/data"
else
python tools/train_tokenizer.py --input "$train_text" --output-prefix "$out/data/spm" --model-type bpe \
    --vocab-size "${VOCAB:-8000}" || exit 1
for split in train valid; do
    text=$train_text; [ "$split" = valid ] && text=$valid_text
    python tools/preprocess_data.py --input "$text" --tokenizer-type sentencepiece --workers 1 --no-progress \
        --tokenizer-model "$out/data/spm.model" --output-prefix "$out/data/$split" || exit 1
done
fi
port=${PORT_BASE:-29650}  # one port per run: PORT_BASE+1, +2, ...; move it when a port is taken
pids=()
for recipe in ${recipes//,/ }; do
    port=$((port + 1))
    rm -f "$out/english_$recipe.jsonl"  # a fresh curve per run
    MASTER_PORT=$port MEGAQ_IGNORE_SLURM=1 timeout "${TIME_LIMIT:-0}" python launch/pretrain_gpt.py \
        --config configs/wikitext_gpt2.json \
        --override quant.recipe="$recipe" --override data.path="$out/data/train" \
        --override data.valid_path="$out/data/valid" --override data.tokenizer.model="$out/data/spm.model" \
        --override train.train_steps="$steps" --override train.decay_steps="$steps" \
        --override checkpoint.dir="$out/$recipe/checkpoints" \
        --override logging.tensorboard_dir="$out/$recipe/tensorboard" \
        --override logging.metrics_file="$out/english_$recipe.jsonl" "$@" \
        > "$out/english_$recipe.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
metrics=()
for recipe in ${recipes//,/ }; do
    if [ -s "$out/english_$recipe.jsonl" ]; then
        metrics+=("$out/english_$recipe.jsonl")
    else
        echo "english_accuracy: $recipe wrote no metrics; see $out/english_$recipe.log" >&2
        status=1
    fi
done
[ ${#metrics[@]} -gt 0 ] && { python tools/plot_curves.py "${metrics[@]}" --out "$out/english_curves.png" \
    --title "GPT-2 124M shape, WikiText-2, 8k BPE, context 512" || status=1; }
exit $status
