#!/bin/bash
# the committed quick no-KD row (benchmarks/results/quick/qskd/no_kd_*), first 200 steps, on CODE_DIR
code=$1; out=$2
cd "$code"; export PYTHONPATH=$code
nice -n 10 /work/main/.venv/bin/python -m detrkd train --config benchmarks/results/quick/qskd/no_kd_config.yaml \
  --set data.root=/work/main/data/digits --set model.pixels=imagenet --set optim.max_steps=200 \
  --set eval_every_epochs=0 --set output_dir=$out --no-progress > $out.log 2>&1 || echo FAIL
