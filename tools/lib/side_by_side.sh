# Sourced by the accuracy scripts (tools/*_accuracy.sh): train several recipes side by side on one GPU.
#   run_side_by_side NAME CONFIG PORT_BASE RECIPES [overrides...]
# Starts one launch/pretrain_gpt.py per recipe (comma-separated RECIPES) in the background on ports
# PORT_BASE+1, +2, ..., each limited to TIME_LIMIT seconds (0 = none), with its checkpoints and
# TensorBoard logs under $out/RECIPE/, its log in $out/NAME_RECIPE.log and its metrics (a fresh file per
# run) in $out/NAME_RECIPE.jsonl; the overrides are passed to every run. Waits for all of them.
# Sets: side_by_side_metrics (the metrics files written), side_by_side_status (0, or 1 if a run failed
# or wrote no metrics). Needs $out set by the caller.
run_side_by_side() {
    local name=$1 config=$2 port=$3 recipes=$4 recipe pid
    shift 4
    local pids=()
    for recipe in ${recipes//,/ }; do
        port=$((port + 1))
        rm -f "$out/${name}_$recipe.jsonl"
        MASTER_PORT=$port MEGAQ_IGNORE_SLURM=1 timeout "${TIME_LIMIT:-0}" python launch/pretrain_gpt.py \
            --config "$config" --override quant.recipe="$recipe" \
            --override checkpoint.dir="$out/$recipe/checkpoints" \
            --override logging.tensorboard_dir="$out/$recipe/tensorboard" \
            --override logging.metrics_file="$out/${name}_$recipe.jsonl" "$@" \
            > "$out/${name}_$recipe.log" 2>&1 &
        pids+=($!)
    done
    side_by_side_status=0
    for pid in "${pids[@]}"; do wait "$pid" || side_by_side_status=1; done
    side_by_side_metrics=()
    for recipe in ${recipes//,/ }; do
        if [ -s "$out/${name}_$recipe.jsonl" ]; then
            side_by_side_metrics+=("$out/${name}_$recipe.jsonl")
        else
            echo "$name: $recipe wrote no metrics; see $out/${name}_$recipe.log" >&2
            side_by_side_status=1
        fi
    done
}
