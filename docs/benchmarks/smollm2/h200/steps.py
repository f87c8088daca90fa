"""Median step time and last step of each noln log.jsonl named."""
import json
import statistics
import sys

for path in sys.argv[1:]:
    try:
        rows = [json.loads(line) for line in open(path)]
    except OSError as e:
        print(path, "unreadable", e)
        continue
    steps = [r for r in rows if "dt" in r]
    events = [r for r in rows if "event" in r]
    dts = [r["dt"] for r in steps[3:]]
    print(path, "steps", len(steps), "last", steps[-1] if steps else None,
          "median dt", statistics.median(dts) if dts else None,
          "events", [e["event"] for e in events][-8:])
