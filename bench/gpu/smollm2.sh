#!/usr/bin/env bash
# On the device machine, in the repository root (bench/gpu/README.md).
#   setup: install the carried wheels, check noln imports and sees the GPU, then issue 15's
#          GPU rows (training throughput, with and without --compile) into $OUT
#   run:   join the GGUF, unpack the data, SmolLM2 removal with its control and the papers'
#          table (HellaSwag, first 2,000 items), the export check; results into $OUT
set -uo pipefail
phase=${1:?usage: smollm2.sh setup|run}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .device/a/whl/*.whl || exit 3
python3 -c "import torch, noln, datasets, gguf; print('noln', noln.__version__, 'torch',
  torch.__version__, torch.cuda.get_device_name())" || exit 3
noln="python3 -m noln.cli"  # timeout runs programs, not shell functions
case $phase in
setup)
  for args in "" "--compile"; do
    timeout 105 python3 bench/throughput.py --size gpt2 --steps 30 --warmup 8 --repeat 2 $args \
      --out "$OUT/throughput.md" 2>&1 | tail -20
  done
  timeout 75 python3 bench/throughput_states.py --size gpt2 --steps 12 --warmup 4 --repeat 2 \
    --out "$OUT/throughput_states.md" 2>&1 | tail -15
  ;;
run)
  mkdir -p /tmp/noln-data /tmp/noln-runs
  cat .device/a/smol.gguf.0 .device/b/smol.gguf.1 > /tmp/noln-data/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat .device/b/smol.gguf.sha256)  /tmp/noln-data/SmolLM2-135M-Instruct.Q4_1.gguf" \
    | sha256sum -c - || exit 4
  for f in train val wiki; do gunzip -c .device/a/$f.jsonl.gz > /tmp/noln-data/$f.jsonl; done
  gunzip -c .device/b/hellaswag.jsonl.gz > /tmp/noln-data/hellaswag.jsonl
  # the removal and its control side by side (a 135M model leaves most of an H200 idle);
  # SIGTERM stops a run as Ctrl-C does: a checkpoint, the log, exit 130
  data="/tmp/noln-data"
  timeout -s TERM "${REMOVE_TIMEOUT:-330}" $noln remove --config bench/gpu/smol.yaml \
    --eval wiki=$data/wiki.jsonl --quiet > "$OUT/remove.txt" 2>&1 &
  timeout -s TERM "${REMOVE_TIMEOUT:-330}" $noln remove --config bench/gpu/smol.yaml --keep-ln \
    --out /tmp/noln-runs/smol-control --eval wiki=$data/wiki.jsonl --quiet \
    > "$OUT/control.txt" 2>&1 &
  wait
  tail -25 "$OUT/remove.txt" "$OUT/control.txt"
  # the papers' table, as --control writes it (run folders load as the models they trained)
  timeout 150 $noln compare $data/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/noln-runs/smol-control \
    /tmp/noln-runs/smol --data val=$data/val.jsonl --data wiki=$data/wiki.jsonl --tokens 16384 \
    --ctx 256 --hellaswag $data/hellaswag.jsonl --hellaswag-limit 2000 \
    --out /tmp/noln-runs/smol/compare --quiet 2>&1 | tee "$OUT/compare.txt" | tail -40
  timeout 120 python3 bench/export_check.py /tmp/noln-runs/smol \
    --json /tmp/noln-runs/smol/export_check.json 2>&1 | tee "$OUT/export_check.txt"
  (cd /tmp/noln-runs && tar czf "$OUT/smol.tgz" --exclude=checkpoints --exclude='model*' \
    --exclude=base smol smol-control)
  ;;
esac
