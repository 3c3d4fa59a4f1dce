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
source tools/lib/side_by_side.sh
# one port per run: PORT_BASE+1, +2, ...; move it when a port is taken
run_side_by_side english configs/wikitext_gpt2.json "${PORT_BASE:-29650}" "$recipes" \
    --override data.path="$out/data/train" --override data.valid_path="$out/data/valid" \
    --override data.tokenizer.model="$out/data/spm.model" \
    --override train.train_steps="$steps" --override train.decay_steps="$steps" "$@"
status=$side_by_side_status
[ ${#side_by_side_metrics[@]} -gt 0 ] && { python tools/plot_curves.py "${side_by_side_metrics[@]}" \
    --out "$out/english_curves.png" --title "GPT-2 124M shape, WikiText-2, 8k BPE, context 512" || status=1; }
exit $status
