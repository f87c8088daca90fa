# As it ran (stop 45): from the repo root on the lent machine, with .dev/b (this script and
# GGUF part 2) carried after call1-setup.sh; docs/BENCHMARKS.md says what it gave.
# call 2 on the lent H200: join the GGUF, then attempt G1 (smol-g1.yaml) and its control in
# parallel (--control / --resume --control-only), the pair's table with HellaSwag at the end.
# usage: bash .dev/b/main.sh BATCH HELLASWAG_LIMIT DEADLINE_S
T0=$(date +%s)
BATCH=${1:-16}; HSL=${2:-2000}; DEADLINE=${3:-540}
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
SH=$(cd ..; pwd)/shared
G=~/.cache/noln/models/SmolLM2-135M-Instruct.Q4_1.gguf
cat /root/gguf.part1 .dev/b/gguf.part2 > $G
sha256sum $G
N="python3 -m noln.cli"
HS="--hellaswag $SH/data/hellaswag/validation.jsonl --hellaswag-limit $HSL"
R=/root/runs/g1
$N remove --config docs/benchmarks/smollm2/smol-g1.yaml --out $R --control $HS batch_size=$BATCH tokens=$((BATCH * 256 * 1000)) --quiet > /root/runs/g1.log 2>&1 & P1=$!
for i in $(seq 120); do [ -f $R/config.yaml ] && break; sleep 1; done
$N remove --resume $R --control-only $HS --quiet > /root/runs/g1-control.log 2>&1 & P2=$!
pack() {
  tar czf $OUT/g1.tgz --exclude=checkpoints --exclude=export --exclude='*.pt' --exclude='*.safetensors' --exclude=tokenizer.json \
    -C /root/runs g1.log g1-control.log g1 2>/dev/null
}
while kill -0 $P1 2>/dev/null || kill -0 $P2 2>/dev/null; do
  sleep 30
  python3 .dev/a/steps.py $R/log.jsonl $R/control/log.jsonl 2>&1 | cut -c1-330
  if [ $(( $(date +%s) - T0 )) -gt $DEADLINE ]; then
    echo "deadline: SIGTERM (checkpoints kept)"; kill -TERM $P1 $P2 2>/dev/null; sleep 40; break
  fi
done
wait
echo "done $(( $(date +%s) - T0 )) s"
tail -n 40 /root/runs/g1.log /root/runs/g1-control.log
cat $R/table.md 2>/dev/null
pack; ls -la $OUT
