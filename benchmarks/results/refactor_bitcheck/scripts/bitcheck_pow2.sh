#!/bin/bash
# usage: bitcheck_pow2.sh CODE_DIR OUT_DIR old|new [steps] -- the methods whose default per-term weights
# include 5 (not a power of two), re-weighted with L1 = 4 so that moving the multiplication is exact
code=$1; out=$2; mode=$3; steps=${4:-30}
cd "$code"
export PYTHONPATH=$code OMP_NUM_THREADS=1
T=/work/main/detrkd/assets/digits_teacher
run() { name=$1; cfg=$2; shift 2
  nice -n 10 /work/main/.venv/bin/python -m detrkd distill --config configs/$cfg.yaml --set data.root=/work/main/data/digits \
    --set teacher=$T --set threads=1 --set optim.max_steps=$steps --set log_every_steps=5 --set eval_every_epochs=0 \
    --set checkpoint_every_steps=0 --set optim.warmup_steps=5 --set output_dir=$out/$name --no-progress "$@" > $out/$name.log 2>&1 || echo "FAIL $name"; }
mkdir -p $out
if [ "$mode" = old ]; then
  W="weights=[1.0,4.0,2.0]"
  run qskd digits_qskd --set methods.lapd.$W
  run kd_detr digits_kd_detr --set methods.kd_detr.$W
  run kd_detr_mean digits_kd_detr --set methods.kd_detr.normalise=mean --set methods.kd_detr.$W
  run active_sampling digits_active_sampling --set methods.active_sampling.bbox_weight=4.0
  run global_alignment digits_global_alignment --set methods.global_alignment.$W
  run lapd_all digits_qskd --set methods.lapd.layers=all --set methods.lapd.$W
else
  run qskd digits_qskd --set methods.lapd.terms.l1=4.0
  run kd_detr digits_kd_detr --set methods.kd_detr.terms.l1=4.0
  run kd_detr_mean digits_kd_detr --set methods.kd_detr.normalise=mean --set methods.kd_detr.terms.l1=4.0
  run active_sampling digits_active_sampling --set methods.active_sampling.terms.l1=4.0
  run global_alignment digits_global_alignment --set methods.global_alignment.terms.l1=4.0
  run lapd_all digits_qskd --set methods.lapd.layers=all --set methods.lapd.terms.l1=4.0
fi
