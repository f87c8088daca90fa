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


def _noln(capsys, *args) -> tuple[int, str]:
    """``noln ARGS`` in this process: (exit code, stderr)."""
    from noln.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_pretrain_resume_keeps_the_runs_shape_and_refuses_another(capsys, text_jsonl, tmp_path):
    """`noln pretrain --resume` builds the model the run saved (a Llama, though --arch's default
    is gpt2) and goes on from its checkpoint; a shape setting that differs from the run's is one
    error line, refused before anything trains."""
    import torch

    out = tmp_path / "p1"
    tiny = ["--layers", "1", "--d-model", "32", "--heads", "2", "--ctx", "32", "--vocab-size",
            "512", "--batch-size", "4", "--warmup-steps", "1", "--quiet"]
    code, err = _noln(capsys, "pretrain", "--arch", "llama", "--data", text_jsonl, "--out", out,
                      "--steps", "4", *tiny)
    assert code == 0, err
    last = out / "checkpoints" / "last.pt"
    before = last.stat().st_mtime_ns

    code, err = _noln(capsys, "pretrain", "--data", text_jsonl, "--out", out, "--resume",
                      "--ctx", "64")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert "--ctx 64 differs from the run's 32" in errors[0] and "drop --ctx" in errors[0]
    assert last.stat().st_mtime_ns == before  # refused before training

    # no --arch, --layers ...: the run's own; --steps may change (the run goes on to step 6)
    code, err = _noln(capsys, "pretrain", "--data", text_jsonl, "--out", out, "--resume",
                      "--steps", "6", "--quiet")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["arch"], summary["n_layer"], summary["ctx"], summary["steps"]) == \
        ("llama", 1, 32, 6)
    assert torch.load(last, weights_only=True)["config"]["arch"] == "llama"
