"""`noln remove --control`: the end-of-run table comes from the shared evaluation code."""

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

import noln
from noln.cli import app, fill_optional_values
from noln.errors import NolnError


def _hellaswag_file(path):
    items = [{"ind": i, "ctx": f"The cat sat on the mat number {i}. It",
              "endings": ["was happy.", "ran off.", "slept all day.", "ate the fish."],
              "label": i % 4} for i in range(5)]
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


def test_remove_with_control_reports_the_compare_table(tiny_model_dir, text_jsonl, tmp_path):
    out = tmp_path / "run"
    hs = _hellaswag_file(tmp_path / "hs.jsonl")
    r = CliRunner().invoke(app, [
        "remove", str(tiny_model_dir), "--data", str(text_jsonl), "--out", str(out),
        "--control", "--steps", "12", "--batch-size", "4", "--ctx", "64", "--lr", "1e-3",
        "--schedule", "fixed", "--format", "hf", "--quiet", "--eval", f"again={text_jsonl}",
        "--hellaswag", str(hs)])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "comparison.json").read_text())
    compare = data["compare"]
    assert set(compare["models"]) == {"original", "finetuned_with_ln", "no_ln"}
    # the runs' own CE (summary.json) and the comparison's CE are the same numbers
    for model, summary in (("no_ln", data["no_ln"]["ce_after"]),
                           ("finetuned_with_ln", data["control"]["ce_after"]),
                           ("original", data["no_ln"]["ce_before"])):
        for source in ("heldout", "again"):
            assert compare["models"][model]["ce"][source]["mean"] == \
                pytest.approx(summary[source]["mean"], abs=1e-5)
    assert compare["models"]["no_ln"]["hellaswag"]["n"] == 5
    # faithfulness to the original: measured for the fine-tuned models, positive KL
    assert compare["models"]["no_ln"]["faithfulness"]["heldout"]["kl"] > 0
    assert compare["delta"] == {"of": "no_ln", "minus": "finetuned_with_ln"}
    assert "no LN" in (out / "table.md").read_text()
    assert any(p.suffix == ".png" for p in (out / "compare").iterdir())
    # the training CE on the same batches, span by span (12 steps: spans of 1), from the logs
    logs = [[e for e in map(json.loads, (run / "log.jsonl").read_text().splitlines())
             if "loss" in e and "event" not in e] for run in (out, out / "control")]
    gap = data["training_gap"]
    assert [(g["first"], g["steps"]) for g in gap] == [(s, 1) for s in range(12)]
    assert [g["gap"] for g in gap] == pytest.approx([a["loss"] - b["loss"]
                                                     for a, b in zip(*logs, strict=True)])
    assert "Training CE on the same batches" in (out / "table.md").read_text()
    # every report of the pair carries noln's mark, as `noln compare --out`'s do
    from noln.outputs import written_by_noln

    reports = [out / "table.md", out / "comparison.json", out / "loss.png",
               *(out / "compare").iterdir()]
    assert [p.name for p in reports if not written_by_noln(p)] == []


def test_hellaswag_without_control_is_refused(tiny_model_dir, tmp_path):
    r = CliRunner().invoke(app, ["remove", str(tiny_model_dir), "--data", "builtin",
                                 "--out", str(tmp_path / "x"), "--hellaswag", "hf"])
    assert r.exit_code != 0
    assert "--control" in str(r.exception)


def test_bare_hellaswag_means_the_hub_split():
    assert fill_optional_values(["eval", "m", "--hellaswag"]) == ["eval", "m", "--hellaswag",
                                                                   "hf"]
    assert fill_optional_values(["eval", "m", "--hellaswag", "--data", "x"]) == \
        ["eval", "m", "--hellaswag", "hf", "--data", "x"]
    assert fill_optional_values(["eval", "m", "--hellaswag", "f.jsonl"]) == \
        ["eval", "m", "--hellaswag", "f.jsonl"]


RUN = ["--batch-size", "4", "--ctx", "64", "--lr", "1e-3", "--format", "hf", "--quiet"]


def test_an_unfinished_removal_spends_no_control(tiny_model_dir, text_jsonl, tmp_path):
    """The removal runs first; when it ends with sites still live, the control is not run,
    no table is written and the user is told how to go on."""
    schedule = tmp_path / "one_site.yaml"  # one site of five: the removal ends unfinished
    schedule.write_text("events:\n  - {step: 2, site: blocks.0.mlp_in}\n")
    out = tmp_path / "run"
    hs = _hellaswag_file(tmp_path / "hs.jsonl")
    r = CliRunner().invoke(app, ["remove", str(tiny_model_dir), "--data", str(text_jsonl),
                                 "--out", str(out), "--control", "--steps", "6", "--schedule",
                                 str(schedule), *RUN, "--hellaswag", str(hs),
                                 "--hellaswag-limit", "3"])
    assert r.exit_code != 0 and isinstance(r.exception, NolnError)  # `noln remove` exits 2
    assert "removal unfinished" in str(r.exception) and "--resume" in str(r.exception)
    # the way on is the whole command: the pair's table with the HellaSwag it asked for
    assert f"`noln remove --resume {out} --control --hellaswag {hs} --hellaswag-limit 3` runs " \
        "the control and the table" in " ".join(r.output.split())
    assert not json.loads((out / "summary.json").read_text())["complete"]
    assert not (out / "control").exists() and not (out / "table.md").exists()
    # with its control training in another process (--control-only), it does not say the
    # control was not run
    import os
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / "control").mkdir()
        (out / "control" / ".noln.lock").write_text(json.dumps({"pid": other.pid,
                                                                "host": os.uname().nodename}))
        # at its last step, a resume of the same length has nothing to train: said up front
        r = CliRunner().invoke(app, ["remove", "--resume", str(out), "--control"])
        assert isinstance(r.exception, NolnError) and f"'{out}' ended at its last step (6), " \
            "removal unfinished: " in str(r.exception) and "sites still live" in \
            str(r.exception) and \
            f"`noln remove --resume {out} --steps 9`" in str(r.exception), r.output
        assert not (out / "control" / "log.jsonl").exists()
        r = CliRunner().invoke(app, ["status", str(out)])  # and noln status says the same
        said = " ".join(r.output.split())
        assert "ended unfinished (sites still live), at step 6 of 6" in said and \
            f"continue it with `noln remove --resume {out} --steps 9`" in said, said
        r = CliRunner().invoke(app, ["remove", "--resume", str(out), "--control", "--steps", "8"])
        said = " ".join(r.output.split())
        assert f"the removal is unfinished (above), while its control trains in another " \
            f"process (PID {other.pid})" in said and "was not run" not in said, said
    finally:
        other.kill()
        other.wait()


def test_resume_with_control_adds_the_control_to_a_finished_removal(tiny_model_dir, text_jsonl,
                                                                    tmp_path):
    """`noln remove --resume RUN --control` on a removal begun without --control: the removal
    is not trained again; the control runs with the removal's settings, LN kept; the table."""
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["remove", str(tiny_model_dir), "--data", str(text_jsonl),
                                 "--out", str(out), "--steps", "12", "--schedule", "fixed",
                                 "--seed", "3", *RUN])
    assert r.exit_code == 0, r.output
    summary, log = (out / "summary.json").read_text(), (out / "log.jsonl").read_text()
    # ... with a text for the table that the removal, begun without it, did not measure
    r = CliRunner().invoke(app, ["remove", "--resume", str(out), "--control",
                                 "--eval", f"again={text_jsonl}"])
    assert r.exit_code == 0, r.output
    assert (out / "summary.json").read_text() == summary  # the removal was not run again
    assert (out / "log.jsonl").read_text() == log
    removal = yaml.safe_load((out / "config.yaml").read_text())
    control = yaml.safe_load((out / "control" / "config.yaml").read_text())
    assert control["keep_ln"] is True and control["out"] == str(out / "control")
    assert removal["eval_sets"] == {} and control["eval_sets"] == {"again": str(text_jsonl)}
    assert {k: v for k, v in control.items() if k not in ("keep_ln", "out", "eval_sets")} == \
        {k: v for k, v in removal.items() if k not in ("keep_ln", "out", "eval_sets")}
    data = json.loads((out / "comparison.json").read_text())
    assert set(data["compare"]["models"]["no_ln"]["ce"]) == {"heldout", "again"}
    assert set(data["table"]) == {"heldout"}  # the runs' own CE: what each measured
    assert data["control"]["keep_ln"] and data["control"]["steps"] == 12
    assert set(data["compare"]["models"]) == {"original", "finetuned_with_ln", "no_ln"}
    assert "no LN" in (out / "table.md").read_text()
    # a control killed before its first checkpoint: resumed, it starts again
    (out / "control" / "summary.json").unlink()
    for f in (out / "control" / "checkpoints").iterdir():
        f.unlink()
    (out / "control" / "checkpoints").rmdir()
    (out / "table.md").unlink()
    r = CliRunner().invoke(app, ["remove", "--resume", str(out), "--control"])
    assert r.exit_code == 0, r.output
    assert "no checkpoint: starting it again" in r.output
    assert json.loads((out / "control" / "summary.json").read_text())["steps"] == 12
    assert (out / "table.md").is_file() and (out / "summary.json").read_text() == summary


def test_the_control_trains_in_its_own_process_beside_the_removal(tiny_model_dir, text_jsonl,
                                                                  tmp_path):
    """`--control-only` trains a pair's control while its removal trains in another process
    (here: a live process holding the removal's lock); each side sees the other at work,
    whichever ends last makes the table, and neither trains the other's run."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["remove", str(tiny_model_dir), "--data", str(text_jsonl),
                                 "--out", str(out), "--steps", "12", "--schedule", "fixed",
                                 *RUN])
    assert r.exit_code == 0, r.output
    removal_log = (out / "log.jsonl").read_text()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        def held_by_other(folder):
            (folder / ".noln.lock").write_text(json.dumps({"pid": other.pid,
                                                           "host": os.uname().nodename}))

        held_by_other(out)  # the removal "still training" in its own process
        r = CliRunner().invoke(app, ["remove", "--resume", str(out), "--control-only"])
        assert r.exit_code == 0, r.output
        assert f"the control is done; the removal trains in another process (PID {other.pid}): " \
            "if that is the pair's (--control), it makes the table when it ends" in \
            " ".join(r.output.split())
        assert json.loads((out / "control" / "summary.json").read_text())["keep_ln"]
        assert (out / "log.jsonl").read_text() == removal_log  # not trained here
        assert not (out / "table.md").exists()
        (out / ".noln.lock").unlink()
        # the removal's process ends while a control trains elsewhere: it says so, no table
        (out / "control" / "summary.json").rename(tmp_path / "control-summary.json")
        held_by_other(out / "control")
        r = CliRunner().invoke(app, ["remove", "--resume", str(out), "--control"])
        assert r.exit_code == 0, r.output
        assert f"the control trains in another process (PID {other.pid})" in r.output
        assert not (out / "table.md").exists()
        (out / "control" / ".noln.lock").unlink()
        (tmp_path / "control-summary.json").rename(out / "control" / "summary.json")
    finally:
        other.kill()
        other.wait()
    control_log = (out / "control" / "log.jsonl").read_text()
    # a removal stopped (killed: no summary, no live lock) while its control ended: the way on
    (out / "summary.json").rename(tmp_path / "summary.json")
    r = CliRunner().invoke(app, ["remove", "--resume", str(out), "--control-only"])
    assert r.exit_code == 0, r.output
    assert f"the removal is not, and no process trains it: `noln remove --resume {out} " \
        "--control` goes on with it" in " ".join(r.output.split())
    (tmp_path / "summary.json").rename(out / "summary.json")
    # both done: the last to end (here, --control-only again) makes the table, training nothing
    r = CliRunner().invoke(app, ["remove", "--resume", str(out), "--control-only"])
    assert r.exit_code == 0, r.output
    assert (out / "table.md").is_file() and (out / "comparison.json").is_file()
    assert (out / "log.jsonl").read_text() == removal_log
    assert (out / "control" / "log.jsonl").read_text() == control_log
    r = CliRunner().invoke(app, ["remove", str(tiny_model_dir), "--data", str(text_jsonl),
                                 "--out", str(tmp_path / "new"), "--control-only"])
    assert isinstance(r.exception, NolnError) and "--resume RUN --control-only" in \
        str(r.exception)
    # the control's own folder, resumed as a pair: refused (it once trained a control of the
    # control and wrote a table with two with-norm models, one called "without LN")
    for flag in ("--control-only", "--control"):
        r = CliRunner().invoke(app, ["remove", "--resume", str(out / "control"), flag])
        assert isinstance(r.exception, NolnError) and \
            f"'{out / 'control'}' is the control of the pair '{out}': continue the pair with " \
            f"`noln remove --resume {out} {flag}`" in str(r.exception), r.output
    assert not (out / "control" / "control").exists() and \
        not (out / "control" / "table.md").exists()


def test_a_removal_that_ends_while_its_control_trains_elsewhere_gets_its_table(
        tiny_model_dir, text_jsonl, tmp_path, monkeypatch):
    """The pair's process (`--control`) ends while `--control-only` still trains the control
    elsewhere, and leaves the table to "whichever ends last": the control's process, which
    began while the removal trained, must look again when the control is done. It used to
    keep what it saw when it began, said "the removal trains in another process" hours after
    that process had ended, and nobody made the table (SmolLM2, attempt 36)."""
    import os
    import subprocess
    import sys

    import noln.remove

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["remove", str(tiny_model_dir), "--data", str(text_jsonl),
                                 "--out", str(out), "--steps", "12", "--schedule", "fixed",
                                 *RUN])
    assert r.exit_code == 0, r.output
    train = noln.remove.remove_layernorm

    def control_while_the_removal_ends(*args, **kwargs):
        (out / ".noln.lock").unlink()  # the removal's process ends while the control trains
        return train(*args, **kwargs)

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:  # the removal "still training" in its own process when the control's begins
        (out / ".noln.lock").write_text(json.dumps({"pid": other.pid,
                                                    "host": os.uname().nodename}))
        monkeypatch.setattr(noln.remove, "remove_layernorm", control_while_the_removal_ends)
        r = CliRunner().invoke(app, ["remove", "--resume", str(out), "--control-only"])
    finally:
        other.kill()
        other.wait()
    assert r.exit_code == 0, r.output
    assert "trains in another process" not in r.output
    assert (out / "table.md").is_file() and (out / "comparison.json").is_file()


def test_a_new_pair_whose_control_trained_beside_it_makes_the_table(tiny_model_dir, text_jsonl,
                                                                  tmp_path, monkeypatch):
    """`noln remove MODEL --control` (a new pair, no --resume) while `--control-only` trains the
    control in another process: when the removal ends, the control is done, and the removal's
    process makes the table. It used to start the control again, and stop at its folder ("already
    holds a run"), on SmolLM2 after 1,000 steps. Here the other process is a call made when
    the removal ends."""
    import noln.remove

    out = tmp_path / "run"
    train = noln.remove.remove_layernorm

    def removal_then_control_elsewhere(*args, **kwargs):
        result = train(*args, **kwargs)
        if not kwargs.get("keep_ln") and kwargs.get("config") is None:  # the removal ended
            monkeypatch.setattr(noln.remove, "remove_layernorm", train)
            noln.remove_with_control(out=out, resume=True, control_only=True)
            # (in this process it finds the removal done and makes a table; in another it
            # would leave it to the removal's process: the removal's process makes it again)
            (out / "table.md").unlink()
            controls.append(json.loads((out / "control" / "summary.json").read_text()))
        return result

    controls = []
    monkeypatch.setattr(noln.remove, "remove_layernorm", removal_then_control_elsewhere)
    result = noln.remove_with_control(str(tiny_model_dir), str(text_jsonl), out, steps=12,
                                      schedule="fixed", batch_size=4, ctx=64,
                                      export_format="none", progress=False)
    assert result["control"] == controls[0]  # read, not trained again
    assert (out / "table.md").is_file()


def test_resume_of_a_pair_whose_control_ran_first(tiny_model_dir, text_jsonl, tmp_path):
    """A pair begun when the control went first (its removal not begun): resumed, the removal
    takes the control's settings without keep_ln; a folder that is no run is one line."""
    out = tmp_path / "run"
    noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), out / "control", keep_ln=True,
                          steps=12, schedule="fixed", batch_size=4, ctx=64,
                          export_format="hf", progress=False)
    result = noln.remove_with_control(out=out, resume=True)
    assert result["no_ln"]["complete"] and not result["no_ln"]["keep_ln"]
    assert result["no_ln"]["steps"] == result["control"]["steps"] == 12
    assert (out / "table.md").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NolnError, match="not a noln run folder"):
        noln.remove_with_control(out=empty, resume=True)
    alone = tmp_path / "ctl"  # a with-norm run of its own is no pair's removal
    shutil.copytree(out / "control", alone)
    with pytest.raises(NolnError, match=f"'{alone}' is a with-norm run \\(keep_ln\\), not a "
                       f"removal: it has no control; continue it with `noln remove --resume "
                       f"{alone}`"):
        noln.remove_with_control(out=alone, resume=True)


def test_a_staged_removal_and_its_control_make_the_same_stages(tiny_model_dir, text_jsonl,
                                                               tmp_path):
    """A removal whose config lowers its lr at step 6 (``stages``): its control starts from
    the settings the removal started with, not those it ended with, and makes the same stage
    at the same step, so both runs see the same learning rates throughout."""
    out = tmp_path / "run"
    r = CliRunner().invoke(app, [
        "remove", str(tiny_model_dir), "--data", str(text_jsonl), "--out", str(out),
        "--control", "--steps", "12", "--batch-size", "4", "--ctx", "64", "--lr", "1e-3",
        "--schedule", "fixed", "--format", "none", "--quiet",
        "stages=[{step: 6, set: {lr: 2.0e-4, warmup_steps: 0}}]"])
    assert r.exit_code == 0, r.output
    assert "step 6, the config's stage: lr 0.0002, warmup_steps 0" in r.output
    lrs = {}
    for name, run in (("no_ln", out), ("control", out / "control")):
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        lrs[name] = [e["lr"] for e in log if "event" not in e]
        assert [{k: e[k] for k in ("event", "step", "set")} for e in log
                if e.get("event") == "stage"] == \
            [{"event": "stage", "step": 6, "set": {"lr": 2e-4, "warmup_steps": 0}}]
        first = yaml.safe_load((run / "config.first.yaml").read_text())
        last = yaml.safe_load((run / "config.yaml").read_text())
        assert (first["lr"], last["lr"], last["keep_ln"]) == (1e-3, 2e-4, name == "control")
    assert lrs["no_ln"] == lrs["control"] and len(lrs["no_ln"]) == 12
    assert lrs["no_ln"][6] < 0.3 * lrs["no_ln"][5]
    assert (out / "table.md").is_file()


def test_a_config_file_with_eval_sets_makes_a_pair(tiny_model_dir, text_jsonl, tmp_path):
    """`noln remove --config FILE --control --eval ...` where FILE names its own ``eval_sets``
    (the SmolLM2 recipe does): both runs and the table measure the file's sets and --eval's
    (it once stopped with an internal error, each set given twice)."""
    config = tmp_path / "pair.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "data": str(text_jsonl), "out": str(tmp_path / "run"),
        "steps": 12, "batch_size": 4, "ctx": 64, "lr": 1e-3, "schedule": "fixed",
        "export_format": "none", "progress": False, "eval_sets": {"file": str(text_jsonl)}}))
    r = CliRunner().invoke(app, ["remove", "--config", str(config), "--control",
                                 "--eval", f"flag={text_jsonl}"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "run"
    for run in (out, out / "control"):
        assert yaml.safe_load((run / "config.yaml").read_text())["eval_sets"] == \
            {"file": str(text_jsonl), "flag": str(text_jsonl)}
    compare = json.loads((out / "comparison.json").read_text())["compare"]
    assert set(compare["models"]["no_ln"]["ce"]) == {"heldout", "file", "flag"}


def test_a_lengthened_staged_removal_gets_a_control_of_its_length(tiny_model_dir, text_jsonl,
                                                                  tmp_path):
    """A staged removal lengthened on resume (``--resume --steps``): its control, begun later,
    trains as many steps as the removal did (it once took the length the removal started
    with), and ``--resume --control --steps`` on a finished pair takes both runs on."""
    sites = ["blocks.0.mlp_in", "blocks.1.mlp_in", "blocks.0.attn_in_qk", "blocks.1.attn_in_qk",
             "blocks.0.attn_in_v", "blocks.1.attn_in_v", "final"]
    schedule = tmp_path / "all.yaml"  # every site frozen by step 7: the run may be extended
    schedule.write_text("events:\n" + "".join(f"  - {{step: {1 + i}, site: {site}}}\n"
                                              for i, site in enumerate(sites)))
    out = tmp_path / "run"

    def steps(run):
        return json.loads((run / "summary.json").read_text())["steps"]

    r = CliRunner().invoke(app, ["remove", str(tiny_model_dir), "--data", str(text_jsonl),
                                 "--out", str(out), "--steps", "10", "--schedule", str(schedule),
                                 *RUN, "stages=[{step: 5, set: {lr: 2.0e-4}}]"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["remove", "--resume", str(out), "--steps", "14", "--quiet"])
    assert r.exit_code == 0, r.output
    assert steps(out) == 14
    r = CliRunner().invoke(app, ["remove", "--resume", str(out), "--control"])
    assert r.exit_code == 0, r.output
    assert steps(out / "control") == 14
    r = CliRunner().invoke(app, ["remove", "--resume", str(out), "--control", "--steps", "16"])
    assert r.exit_code == 0, r.output
    assert steps(out) == steps(out / "control") == 16
    table = json.loads((out / "comparison.json").read_text())
    assert table["no_ln"]["steps"] == table["control"]["steps"] == 16


def test_a_hellaswag_ending_longer_than_the_context_is_refused_before_training(
        tiny_model_dir, text_jsonl, tmp_path):
    """The pair's table scores HellaSwag after both runs have trained: an ending the model
    cannot take is one line at the start, not an error hours later."""
    hs = tmp_path / "long.jsonl"
    long = " ".join(["the cat sat on the mat"] * 30)  # ~180 tokens, the tiny model takes 64
    hs.write_text(json.dumps({"ind": 0, "ctx": "It", "label": 0,
                              "endings": [long, "ran.", "sat.", "ate."]}) + "\n")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["remove", str(tiny_model_dir), "--data", str(text_jsonl),
                                 "--out", str(out), "--control", "--steps", "6", *RUN,
                                 "--hellaswag", str(hs)])
    assert r.exit_code != 0 and isinstance(r.exception, NolnError)
    assert "more than the model's context of 64" in str(r.exception)
    assert not out.exists()  # refused before the removal began
