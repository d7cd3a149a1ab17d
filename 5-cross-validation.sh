#!/usr/bin/env bash
# Five-fold cross-validation of UNet3D: train and evaluate folds 0-4, then print every fold's
# dice and their averages.
#
# usage: 5-cross-validation.sh DATA_DIR RESULTS_DIR BATCH_SIZE PRECISION [more main.py flags]
#   PRECISION is fp32 or bf16. Fold N goes to RESULTS_DIR/fold_N (checkpoints and log.json).
#   A fold that already has its evaluation is skipped, so after a failure run the same command
#   again to finish the missing folds (an interrupted fold resumes from its checkpoint).
set -uo pipefail
if [ $# -lt 4 ]; then
    echo "usage: $0 DATA_DIR RESULTS_DIR BATCH_SIZE PRECISION [more main.py flags]" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$here/.venv/bin/python" ]; then python="$here/.venv/bin/python"; else python=python3; fi
fi
data_dir=$1 results_dir=$2 batch_size=$3 precision=$4
shift 4

for fold in 0 1 2 3 4; do
    fold_dir="$results_dir/fold_$fold"
    if "$python" "$here/cli/parse_results.py" --check "$fold_dir"; then
        echo "fold $fold: already evaluated, skipped"
        continue
    fi
    echo "fold $fold: training and evaluating into $fold_dir"
    if ! "$python" "$here/main.py" --exec_mode train_and_evaluate --data_dir "$data_dir" \
            --model_dir "$fold_dir" --log_dir "$fold_dir" --batch_size "$batch_size" \
            --dtype "$precision" --fold "$fold" --num_folds 5 --resume_training "$@"; then
        echo "5-cross-validation.sh: fold $fold failed (see above); fix the cause and run the same" \
             "command again to finish the missing folds" >&2
        exit 1
    fi
done
"$python" "$here/cli/parse_results.py" "$results_dir"
