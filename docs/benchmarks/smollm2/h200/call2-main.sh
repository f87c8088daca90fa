# As it ran for G1 (stop 45), but for the helpers' paths (now this tracked folder: G1's
# call 2 lost .dev/a, and with it steps.py's progress lines) and the SMOKE / CONFIG
# switches for G2 (and the run folder, named after the config: G1's was /root/runs/g1).
# Run from the repo root on the lent machine, with .dev/b (this script's GGUF part 2) carried
# after call1-setup.sh; docs/BENCHMARKS.md says what it gave.
# call 2 on the lent H200: join the GGUF, then attempt G1 (smol-g1.yaml) and its control in
# parallel (--control / --resume --control-only), the pair's table with HellaSwag at the end.
# usage: bash .dev/b/main.sh BATCH HELLASWAG_LIMIT DEADLINE_S [CONFIG]
# (G1: `16 2000 500`; G2: `32 2000 540 docs/benchmarks/smollm2/smol-g2.yaml`; G3, the issue's
# 2M-token budget with the preset's recipe, 46b: `8 2000 540 docs/benchmarks/smollm2/smol-c46b.yaml`)
T0=$(date +%s)
BATCH=${1:-16}; HSL=${2:-2000}; DEADLINE=${3:-540}
CONFIG=${4:-docs/benchmarks/smollm2/smol-g1.yaml}
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
SH=$(cd ..; pwd)/shared
G=~/.cache/noln/models/SmolLM2-135M-Instruct.Q4_1.gguf
cat /root/gguf.part1 .dev/b/gguf.part2 > $G
sha256sum $G
N="python3 -m noln.cli"
HS="--hellaswag $SH/data/hellaswag/validation.jsonl --hellaswag-limit $HSL"
NAME=$(basename $CONFIG .yaml); R=/root/runs/$NAME
$N remove --config $CONFIG --out $R --control $HS batch_size=$BATCH tokens=$((BATCH * 256 * 1000)) --quiet > /root/runs/$NAME.log 2>&1 & P1=$!
for i in $(seq 120); do [ -f $R/config.yaml ] && break; sleep 1; done
$N remove --resume $R --control-only $HS --quiet > /root/runs/$NAME-control.log 2>&1 & P2=$!
pack() {
  tar czf $OUT/$NAME.tgz --exclude=checkpoints --exclude=export --exclude='*.pt' --exclude='*.safetensors' --exclude=tokenizer.json \
    -C /root/runs $NAME.log $NAME-control.log $NAME 2>/dev/null
}
while kill -0 $P1 2>/dev/null || kill -0 $P2 2>/dev/null; do
  sleep 30
  python3 docs/benchmarks/smollm2/h200/steps.py $R/log.jsonl $R/control/log.jsonl 2>&1 | cut -c1-330
  if [ $(( $(date +%s) - T0 )) -gt $DEADLINE ]; then
    echo "deadline: SIGTERM (checkpoints kept)"; kill -TERM $P1 $P2 2>/dev/null; sleep 40; break
  fi
done
wait
echo "done $(( $(date +%s) - T0 )) s"
tail -n 40 /root/runs/$NAME.log /root/runs/$NAME-control.log
cat $R/table.md 2>/dev/null
pack; ls -la $OUT
