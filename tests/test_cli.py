"""The README's first command: `noln demo` (here its --quick size) end to end, offline."""

import json
import subprocess
import sys


def test_demo_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-c", "from noln.cli import main; main()", "demo",
                        "--quick", "--quiet", "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "no LN" in p.stdout + p.stderr
    removal = out / "removal"
    for name in ("loss.png", "table.md", "comparison.json", "model/config.json",
                 "model-clean/noln.json", "control/model/config.json", "log.jsonl"):
        assert (removal / name).exists(), name
    table = json.loads((removal / "comparison.json").read_text())["table"]["heldout"]
    assert all(v["mean"] > 0 for v in table.values())
