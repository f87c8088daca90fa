#!/usr/bin/env bash
# On the device machine, in the repository root (bench/gpu/README.md).
#   install: install the carried wheels and check that noln sees the GPU, nothing else
#   setup: install the carried wheels, check noln imports and sees the GPU; issue 12's bf16 vs
#          fp32 removal on ref-gpt2-6L; issue 15's GPU rows (training throughput, with and
#          without --compile); results into $OUT
#   run:   join the GGUF, unpack the data, SmolLM2 removal with its control and the papers'
#          table (HellaSwag, first 2,000 items), the export check; results into $OUT
set -uo pipefail
phase=${1:?usage: smollm2.sh install|setup|run}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .device/a/whl/*.whl || exit 3
python3 -c "import torch, noln, datasets, gguf; print('noln', noln.__version__, 'torch',
  torch.__version__, torch.cuda.get_device_name())" || exit 3
noln="python3 -m noln.cli"  # timeout runs programs, not shell functions
case $phase in
install) ;;  # the wheels and the check above only: call 1 of a session that runs only SmolLM2
setup)
  # issue 12: a bf16 removal against fp32 ones on ref-gpt2-6L (the seed-to-seed spread of fp32
  # is the yardstick), all three side by side, the removal_quality.py "adaptive" settings
  mkdir -p /tmp/noln-data /tmp/noln-runs
  tar xzf .device/a/ref-gpt2-6L.tgz -C /tmp/noln-data
  for f in train val wiki; do gunzip -c .device/a/$f.jsonl.gz > /tmp/noln-data/$f.jsonl; done
  for run in bf16:0 fp32:0 fp32:1; do
    p=${run%:*} seed=${run#*:}
    timeout -s TERM 100 $noln remove /tmp/noln-data/ref-gpt2-6L --data /tmp/noln-data/train.jsonl \
      --eval-data /tmp/noln-data/val.jsonl --eval-tokens 16384 \
      --eval wiki=/tmp/noln-data/wiki.jsonl --steps 146 --batch-size 16 --ctx 256 --lr 3e-4 \
      --min-lr 3e-5 --precision $p --seed $seed --format none --quiet \
      --out /tmp/noln-runs/ref-$p-$seed > "$OUT/ref-$p-$seed.txt" 2>&1 &
  done
  wait
  python3 - /tmp/noln-runs > "$OUT/ref_precision.md" <<'PY'
import json, sys
from pathlib import Path
print("| run | precision | complete | val CE | wiki CE | tokens |")
print("| --- | --- | --- | ---: | ---: | ---: |")
for run in sorted(Path(sys.argv[1]).glob("ref-*")):
    s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    ce = s.get("ce_after", {})
    print(f"| {run.name} | {s.get('precision')} | {s.get('complete')} | "
          f"{ce.get('heldout', {}).get('mean', float('nan')):.4f} | "
          f"{ce.get('wiki', {}).get('mean', float('nan')):.4f} | {s.get('tokens')} |")
PY
  cat "$OUT/ref_precision.md"
  # issue 15: the GPU rows (GPT-2 small, random init), with and without --compile
  timeout 60 python3 bench/throughput.py --size gpt2 --steps 20 --warmup 6 --repeat 2 \
    --out "$OUT/throughput.md" 2>&1 | tail -12
  timeout 75 python3 bench/throughput.py --size gpt2 --steps 20 --warmup 6 --repeat 2 --compile \
    --out "$OUT/throughput.md" 2>&1 | tail -12
  timeout 45 python3 bench/throughput_states.py --size gpt2 --steps 10 --warmup 3 --repeat 2 \
    --out "$OUT/throughput_states.md" 2>&1 | tail -12
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
  timeout -s TERM "${REMOVE_TIMEOUT:-300}" $noln remove --config bench/gpu/smol.yaml \
    --eval wiki=$data/wiki.jsonl --quiet > "$OUT/remove.txt" 2>&1 &
  timeout -s TERM "${REMOVE_TIMEOUT:-300}" $noln remove --config bench/gpu/smol.yaml --keep-ln \
    --out /tmp/noln-runs/smol-control --eval wiki=$data/wiki.jsonl --quiet \
    > "$OUT/control.txt" 2>&1 &
  wait
  tail -25 "$OUT/remove.txt" "$OUT/control.txt"
  # the papers' table, as --control writes it (run folders load as the models they trained)
  timeout 120 $noln compare $data/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/noln-runs/smol-control \
    /tmp/noln-runs/smol --data val=$data/val.jsonl --data wiki=$data/wiki.jsonl --tokens 16384 \
    --ctx 256 --hellaswag $data/hellaswag.jsonl --hellaswag-limit 2000 \
    --out /tmp/noln-runs/smol/compare --quiet 2>&1 | tee "$OUT/compare.txt" | tail -40
  timeout 70 python3 bench/export_check.py /tmp/noln-runs/smol \
    --json /tmp/noln-runs/smol/export_check.json 2>&1 | tee "$OUT/export_check.txt"
  (cd /tmp/noln-runs && tar czf "$OUT/smol.tgz" --exclude=checkpoints --exclude='model*' \
    --exclude=base smol smol-control)
  ;;
esac
