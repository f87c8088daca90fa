"""Two processes (torchrun, gloo on CPU) train to what one process does on the same global batch.

One process: batch 8 in micro-batches of 4 (two accumulation steps). Two processes: micro-batches
of 2 each, so the i-th micro-batches of the two ranks together are the one process's i-th
micro-batch (``idx[rank::world]``). FakeNorm's EMA all-reduces its statistics over the ranks and
DDP averages the gradients, so sigmas, removals and weights agree up to float summation order.
The adaptive schedule asks for the probe loss to fall 0.04 nats below its level at the previous
removal: four of the seven removals are the probe's decision (the nearest call is 9e-4 nats from
its threshold, float differences are ~1e-6), the others forced by the deadline.

Tolerances: every sigma ``rtol=1e-5`` (measured: 6.5e-8 relative); weights ``rtol=1e-5,
atol=1e-5`` (measured: 7.5e-8 absolute on one machine; on another, all but one element of
``h.0.mlp.c_proj.weight`` within 5.6e-8 and that one 1.46e-6 off, float order that Adam's
normalised steps carried), except attention's key bias: its true gradient is zero (softmax
ignores a shift shared by all keys), so Adam turns float noise into steps (1.1e-6 here) and it
is left out; logged losses and probe losses ``abs=1e-5`` (measured: 1e-6). The bound sits under
what a wrong run gives: without FakeNorm's all-reduce each rank's sigma tracks its half of the
batch: sigmas 7e-3 off, weights 8e-5; without the trainer's all-reduce of the aux loss's target:
sigmas 4e-4, weights 3e-4.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

import noln
from noln.checkpoint import load_checkpoint

STEPS = 24
SCHEDULE = "type: adaptive\nstart: 2\nmin_gap: 1\nmax_gap: 8\nfinish_by: 1.0\ntolerance: -0.04\n"
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


def _args(model, data, out, micro, fmt="none"):
    schedule = out.parent / "schedule.yaml"
    schedule.write_text(SCHEDULE)
    return ["remove", str(model), "--data", str(data), "--out", str(out), "--steps", str(STEPS),
            "--batch-size", "8", "--micro-batch-size", str(micro), "--ctx", "64", "--lr", "1e-3",
            "--schedule", str(schedule), "--precision", "fp32",
            "--checkpoint-every", "100", "--format", fmt, "--quiet"]


def _env():
    # CPU only and one thread per process: the two runs do the same arithmetic in each kernel
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "ACCELERATE_USE_CPU": "1"}


def _read(run):
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return load_checkpoint(run / "checkpoints" / "last.pt"), log


def _launch_two(*args, env=None):
    # --standalone: the rendezvous takes a free port, so parallel CI jobs do not collide
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", "-m", "noln.cli", *args],
                   check=True, env=env or _env(), timeout=300)


def _assert_same_run(one, two, n_removals=7):
    """Same removals at the same steps, same sigmas, weights, AdamW moments and losses."""
    a, log_a = _read(one)
    b, log_b = _read(two)
    assert a["step"] == b["step"] == STEPS
    events = [[(e["step"], e["site"]) for e in log if e.get("event") == "remove"]
              for log in (log_a, log_b)]
    assert events[0] == events[1] and len(events[0]) == n_removals
    sigmas = [k for k in a["model"] if k.endswith(".sigma")]
    assert len(sigmas) == 7
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        x, y = a["model"][k], b["model"][k]
        if k in sigmas:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=0, msg=k)
        elif not x.is_floating_point():  # is_frozen, n_updates
            assert torch.equal(x, y), k
        else:
            if k.endswith("attn.c_attn.bias"):  # [q | k | v]: drop the key bias (see above)
                d = x.shape[0] // 3
                x, y = torch.cat([x[:d], x[2 * d :]]), torch.cat([y[:d], y[2 * d :]])
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=k)
    # the optimizer state in the one-process format, parameter by parameter
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert [g["params"] for g in opt_a["param_groups"]] == \
        [g["params"] for g in opt_b["param_groups"]]
    assert opt_a["state"].keys() == opt_b["state"].keys() and len(opt_a["state"]) == 28
    for i, sa in opt_a["state"].items():
        sb = opt_b["state"][i]
        assert float(sa["step"]) == float(sb["step"]) == STEPS
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[moment], sb[moment], rtol=1e-4, atol=1e-8,
                                       msg=f"{i} {moment}")
    for key in ("loss", "probe_before", "probe_after"):
        va = [e[key] for e in log_a if key in e]
        vb = [e[key] for e in log_b if key in e]
        assert va == pytest.approx(vb, abs=1e-5), key


@pytest.fixture(scope="module")
def one_process_run(tiny_model_dir, text_jsonl, tmp_path_factory):
    one = tmp_path_factory.mktemp("one") / "run"
    subprocess.run([sys.executable, "-m", "noln.cli", *_args(tiny_model_dir, text_jsonl, one, 4)],
                   check=True, env=_env(), timeout=300)
    return one


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_match_one(one_process_run, tiny_model_dir, text_jsonl, tmp_path,
                                 sharding):
    """DDP replicates the model on each process; FSDP (``--fsdp``) shards weights, gradients
    and AdamW state. Either way the run is the one-process run."""
    two = tmp_path / "two"
    extra = ["--fsdp"] if sharding == "fsdp" else []
    _launch_two(*_args(tiny_model_dir, text_jsonl, two, 2, fmt="both"), *extra)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["sharded"] == (sharding == "fsdp")
    # one process exported (no two writers racing on the same folders), and it loads
    assert set(summary["exports"]) == {"hf", "clean"}
    noln.load_model(two / "model")
    noln.load_model(two / "model-clean")
    _assert_same_run(one_process_run, two)


def test_sigterm_to_one_process_stops_both_after_one_saved_step(one_process_run, tiny_model_dir,
                                                               text_jsonl, tmp_path):
    """A stop signal can reach one process steps before the other (here only rank 1 gets it):
    with each step's loss the processes agree to stop after the same step, save it and exit,
    and resumed on two processes the run is the one-process run."""
    two = tmp_path / "two"
    stopper = tmp_path / "stop_rank_1.py"
    stopper.write_text(textwrap.dedent(f"""
        import os, signal, threading, time
        from pathlib import Path
        from noln.cli import main

        log = Path({str(two / "log.jsonl")!r})

        def steps_logged():
            lines = log.read_text().splitlines() if log.exists() else []
            return sum('"loss"' in line and '"event"' not in line for line in lines)

        def stop():  # rank 1 alone, once rank 0 has logged 10 steps
            while steps_logged() < 10:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)

        if os.environ["RANK"] == "1":
            threading.Thread(target=stop, daemon=True).start()
        main()
        """))
    stopped = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", "2", str(stopper),
                              *_args(tiny_model_dir, text_jsonl, two, 2)],
                             env=_env(), timeout=300, capture_output=True, text=True)
    assert stopped.returncode != 0
    step = load_checkpoint(two / "checkpoints" / "last.pt")["step"]
    logged = [e for e in _read(two)[1] if "event" not in e]
    assert 10 <= step < STEPS and len(logged) == step, stopped.stderr[-2000:]
    assert f"interrupted: saved at step {step}" in stopped.stderr
    _launch_two("remove", "--resume", str(two), "--quiet")
    _assert_same_run(one_process_run, two)


def test_sharded_run_resumes_a_one_process_checkpoint(tiny_model_dir, text_jsonl, tmp_path):
    """Checkpoints have one format: a one-process run stopped at step 12 and resumed on two
    processes under FSDP (set as ``accelerate launch --use_fsdp`` does, by the environment)
    ends where the uninterrupted run ends. No --micro-batch-size: each process takes
    batch / processes, so the config means the same global micro-batch on one or two."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = _args(tiny_model_dir, text_jsonl, whole, 4)
    args[args.index("--micro-batch-size"): args.index("--micro-batch-size") + 2] = []
    args[args.index("--checkpoint-every") + 1] = "12"
    subprocess.run([sys.executable, "-m", "noln.cli", *args], check=True, env=_env(),
                   timeout=300)
    shutil.copytree(whole, resumed)
    ckpts = resumed / "checkpoints"
    os.replace(ckpts / "prev.pt", ckpts / "last.pt")  # back to the step-12 checkpoint
    assert load_checkpoint(ckpts / "last.pt")["step"] == 12
    (resumed / "summary.json").unlink()
    _launch_two("remove", "--resume", str(resumed), "--quiet",
                env={**_env(), "ACCELERATE_USE_FSDP": "true"})
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sharded"]
    _assert_same_run(whole, resumed)
