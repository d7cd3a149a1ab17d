#!/usr/bin/env bash
# Five-fold cross-validation of UNet3D: train and evaluate folds 0-4, then print every fold's
# dice and their averages.
#
# usage: [WORKERS=N] 5-cross-validation.sh DATA_DIR RESULTS_DIR BATCH_SIZE PRECISION [more main.py flags]
#   PRECISION is fp32 or bf16. Fold N goes to RESULTS_DIR/fold_N (checkpoints and log.json).
#   A fold that already has its evaluation is skipped, so after a failure run the same command
#   again to finish the missing folds (an interrupted fold resumes from its checkpoint).
#   A trailing --num_folds K runs folds 0 to K-1 instead. With --choose_postprocessing among the
#   flags (beside --sliding_window --challenge_metrics), the postprocessing is then chosen again on
#   the folds' validation cases pooled and written into RESULTS_DIR/fold_0 for their ensemble
#   (runtime/pool_postprocessing.py).
# Environment:
#   WORKERS      processes per fold (default 1); above 1 each fold runs under `mpirun -np WORKERS`
#                (the reference ran 8), on either backend
#   MPIRUN       the mpirun to use (default: the one beside PYTHON, else mpirun on PATH)
#   MPIRUN_ARGS  more mpirun arguments, e.g. "--oversubscribe" or "-H node0:4,node1:4"
#   PYTHON       the Python to run main.py with (default: .venv/bin/python beside this script)
set -uo pipefail
if [ $# -lt 4 ]; then
    echo "usage: [WORKERS=N] $0 DATA_DIR RESULTS_DIR BATCH_SIZE PRECISION [more main.py flags]" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$here/.venv/bin/python" ]; then python="$here/.venv/bin/python"; else python=python3; fi
fi
data_dir=$1 results_dir=$2 batch_size=$3 precision=$4
shift 4

folds=5
pool=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
        --num_folds) folds=${args[i + 1]:-} ;;
        --num_folds=*) folds=${args[i]#--num_folds=} ;;
        --choose_postprocessing) pool=1 ;;
    esac
done
if ! [[ $folds =~ ^[0-9]+$ ]] || [ "$folds" -lt 2 ]; then
    echo "5-cross-validation.sh: --num_folds must be an integer of at least 2, got '$folds'" >&2
    exit 2
fi

workers=${WORKERS:-1}
if ! [[ $workers =~ ^[0-9]+$ ]] || [ "$workers" -lt 1 ]; then
    echo "5-cross-validation.sh: WORKERS must be a positive integer, got '$workers'" >&2
    exit 2
fi
launch=()
if [ "$workers" -gt 1 ]; then
    mpirun=${MPIRUN:-}
    if [ -z "$mpirun" ]; then
        beside="$(dirname "$(command -v "$python" || echo "$python")")/mpirun"
        if [ -x "$beside" ]; then mpirun=$beside; else mpirun=$(command -v mpirun || true); fi
    fi
    if [ -z "$mpirun" ] || ! [ -x "$(command -v "$mpirun" || true)" ]; then
        echo "5-cross-validation.sh: WORKERS=$workers needs mpirun (Open MPI): none beside $python" \
             "or on PATH; install it or name it in MPIRUN" >&2
        exit 2
    fi
    read -r -a mpirun_args <<< "${MPIRUN_ARGS:-}"
    launch=("$mpirun" -np "$workers" "${mpirun_args[@]}")
fi

for ((fold = 0; fold < folds; fold++)); do
    fold_dir="$results_dir/fold_$fold"
    if "$python" "$here/runtime/parse_results.py" --check "$fold_dir"; then
        echo "fold $fold: already evaluated, skipped"
        continue
    fi
    echo "fold $fold: training and evaluating into $fold_dir ($workers worker(s))"
    if ! "${launch[@]}" "$python" "$here/main.py" --exec_mode train_and_evaluate \
            --data_dir "$data_dir" --model_dir "$fold_dir" --log_dir "$fold_dir" \
            --batch_size "$batch_size" --dtype "$precision" --fold "$fold" --num_folds 5 \
            --resume_training "$@"; then
        echo "5-cross-validation.sh: fold $fold failed (see above); fix the cause and run the same" \
             "command again to finish the missing folds" >&2
        exit 1
    fi
done
"$python" "$here/runtime/parse_results.py" "$results_dir" --folds "$folds" || exit 1
if [ "$pool" -eq 1 ]; then
    fold_dirs=()
    for ((fold = 0; fold < folds; fold++)); do fold_dirs+=("$results_dir/fold_$fold"); done
    echo "choosing the postprocessing on the $folds folds' validation cases pooled"
    PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" \
        "$python" -m runtime.pool_postprocessing "${fold_dirs[@]}" || exit 1
fi
