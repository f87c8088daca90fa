# As it ran for G1 (stop 45), but for the helpers' paths (now this tracked folder: G1's
# call 2 lost .dev/a, and with it steps.py's progress lines) and the SMOKE / CONFIG
# switches for G2.
# Run from the repo root on the lent machine, with .whl (wheels) and .dev/a (GGUF part 1, the
# data, smolcfg: the GGUF's config and tokenizer) carried; docs/BENCHMARKS.md says what it gave.
# call 1 on the lent H200: install the wheels, park GGUF part 1 and the data, smoke-run the
# recipe on a random-weight model of SmolLM2-135M's shapes, and time it
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
SH=$(cd ..; pwd)/shared
mkdir -p ~/.cache/noln/models $SH/data/corpus $SH/data/hellaswag /root/runs
cp .dev/a/gguf.part1 /root/gguf.part1
cp .dev/a/val.jsonl .dev/a/wiki.jsonl $SH/data/corpus/
python3 - <<'PY'
import lzma, shutil
for src, dst in ((".dev/a/validation.jsonl.xz", "../shared/data/hellaswag/validation.jsonl"),
                 (".dev/a/train.jsonl.xz", "../shared/data/corpus/train.jsonl")):
    with lzma.open(src) as f, open(dst, "wb") as g:
        shutil.copyfileobj(f, g)
PY
ls -la $SH/data/corpus $SH/data/hellaswag
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -c "import torch, transformers, datasets, accelerate, pydantic, typer, noln; print(torch.__version__, transformers.__version__, datasets.__version__, accelerate.__version__, pydantic.__version__, torch.cuda.is_available())" || exit 1
[ "${SMOKE:-1}" = 1 ] || { echo "setup $(( $(date +%s) - T0 )) s"; exit 0; }  # (G2: SMOKE=0, the environment is known)
python3 docs/benchmarks/smollm2/h200/make_smoke.py /root/smoke .dev/a/smolcfg 2>&1 | grep -v shards
N="python3 -m noln.cli"
echo "setup $(( $(date +%s) - T0 )) s"
timeout -s TERM 75 $N remove /root/smoke --config docs/benchmarks/smollm2/smol-g1.yaml --out /root/runs/smoke --control --quiet > /root/runs/smoke-rm.log 2>&1 & P1=$!
for i in $(seq 60); do [ -f /root/runs/smoke/config.yaml ] && break; sleep 1; done
timeout -s TERM 60 $N remove --resume /root/runs/smoke --control-only --quiet > /root/runs/smoke-ctl.log 2>&1 & P2=$!
wait $P1 $P2
echo "trained $(( $(date +%s) - T0 )) s"
tail -n 5 /root/runs/smoke-rm.log /root/runs/smoke-ctl.log
python3 docs/benchmarks/smollm2/h200/steps.py /root/runs/smoke/log.jsonl /root/runs/smoke/control/log.jsonl
nvidia-smi --query-gpu=memory.used --format=csv
T1=$(date +%s)
$N eval /root/smoke --hellaswag $SH/data/hellaswag/validation.jsonl --hellaswag-limit 400 --data val=$SH/data/corpus/val.jsonl --tokens 16384 --ctx 256 > /root/runs/smoke-eval.log 2>&1
tail -n 25 /root/runs/smoke-eval.log
echo "eval $(( $(date +%s) - T1 )) s; total $(( $(date +%s) - T0 )) s"
cp /root/runs/smoke-*.log $OUT/ 2>/dev/null; cp /root/runs/smoke/log.jsonl $OUT/smoke-log.jsonl 2>/dev/null
df -h /root | tail -1
