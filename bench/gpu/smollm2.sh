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
noln() { python3 -m noln.cli "$@"; }
case $phase in
setup)
  for args in "" "--compile"; do
    timeout 100 python3 bench/throughput.py --size gpt2 --steps 30 --warmup 8 --repeat 2 $args \
      --out "$OUT/throughput.md" 2>&1 | tail -20
  done
  timeout 90 python3 bench/throughput_states.py --size gpt2 --steps 12 --warmup 4 --repeat 2 \
    --out "$OUT/throughput_states.md" 2>&1 | tail -15
  ;;
run)
  mkdir -p /tmp/noln-data /tmp/noln-runs
  cat .device/a/smol.gguf.0 .device/b/smol.gguf.1 > /tmp/noln-data/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat .device/b/smol.gguf.sha256)  /tmp/noln-data/SmolLM2-135M-Instruct.Q4_1.gguf" \
    | sha256sum -c - || exit 4
  for f in train val wiki; do gunzip -c .device/a/$f.jsonl.gz > /tmp/noln-data/$f.jsonl; done
  gunzip -c .device/b/hellaswag.jsonl.gz > /tmp/noln-data/hellaswag.jsonl
  # SIGTERM stops a run as Ctrl-C does: a checkpoint, the log, exit 130
  timeout -s TERM "${REMOVE_TIMEOUT:-420}" noln remove --config bench/gpu/smol.yaml --control \
    --eval wiki=/tmp/noln-data/wiki.jsonl --hellaswag /tmp/noln-data/hellaswag.jsonl \
    --hellaswag-limit 2000 --quiet 2>&1 | tee "$OUT/remove.txt" | tail -40
  timeout 120 python3 bench/export_check.py /tmp/noln-runs/smol \
    --json /tmp/noln-runs/smol/export_check.json 2>&1 | tee "$OUT/export_check.txt"
  (cd /tmp/noln-runs && tar czf "$OUT/smol.tgz" --exclude=checkpoints --exclude='model*' \
    --exclude=base smol)
  ;;
esac
