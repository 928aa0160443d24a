#!/bin/bash
# usage: bitcheck.sh CODE_DIR OUT_DIR [steps]  -- short distillation runs of every method, for bit-for-bit comparison
code=$1; out=$2; steps=${3:-30}
cd "$code"
export PYTHONPATH=$code OMP_NUM_THREADS=1
T=/work/main/detrkd/assets/digits_teacher
run() { name=$1; cfg=$2; shift 2
  nice -n 10 /work/main/.venv/bin/python -m detrkd distill --config configs/$cfg.yaml --set data.root=/work/main/data/digits \
    --set teacher=$T --set threads=1 --set optim.max_steps=$steps --set log_every_steps=5 --set eval_every_epochs=0 \
    --set checkpoint_every_steps=0 --set optim.warmup_steps=5 --set output_dir=$out/$name --no-progress "$@" > $out/$name.log 2>&1 || echo "FAIL $name"; }
mkdir -p $out
run qskd digits_qskd
run kd_detr digits_kd_detr
run kd_detr_mean digits_kd_detr --set methods.kd_detr.normalise=mean
run active_sampling digits_active_sampling
run global_alignment digits_global_alignment
run fitnet digits_fitnet
run lapd_all digits_qskd --set methods.lapd.layers=all
run none digits_qskd --set "methods={}"
