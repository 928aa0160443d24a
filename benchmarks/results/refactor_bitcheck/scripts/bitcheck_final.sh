#!/bin/bash
# after the issue 17 / 18 merges: no-KD, FitNet (default weights) and QSKD (L1 4) once more on CODE_DIR
code=$1; out=$2
cd "$code"; export PYTHONPATH=$code OMP_NUM_THREADS=1
T=/work/main/detrkd/assets/digits_teacher
run() { name=$1; cfg=$2; shift 2
  nice -n 10 /work/main/.venv/bin/python -m detrkd distill --config configs/$cfg.yaml --set data.root=/work/main/data/digits \
    --set teacher=$T --set threads=1 --set optim.max_steps=30 --set log_every_steps=5 --set eval_every_epochs=0 \
    --set checkpoint_every_steps=0 --set optim.warmup_steps=5 --set output_dir=$out/$name --no-progress "$@" > $out/$name.log 2>&1 || echo "FAIL $name"; }
mkdir -p $out
run none digits_qskd --set "methods={}"
run fitnet digits_fitnet
run qskd digits_qskd --set methods.lapd.terms.l1=4.0
