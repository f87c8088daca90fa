"""noln against what a user would run instead, whole commands back to back on the same inputs.

Jobs (each run as its own process, load + tokenise + forward + score, wall time):

- ``hellaswag``: lm-evaluation-harness (``lm_eval --model hf ... --tasks noln_hellaswag
  --batch_size 32``, the harness's own HellaSwag scoring on the same local items) against
  ``noln eval MODEL --hellaswag PATH --hellaswag-limit N``. Agreement: acc and acc_norm, and
  the largest difference of the per-ending log-likelihoods (lm-eval's ``--log_samples`` against
  ``noln.evaluate.hellaswag.score_items``, in this process after the timed runs).
- ``linearity``: llm-microscope's ``procrustes_similarity`` (float64) on every token's hidden
  states, as its README uses it, against ``noln linearity MODEL --data PATH --tokens N``.
  Where llm-microscope is not installed, the plain-torch reading of the definition
  (centre, Frobenius-normalise, ``torch.linalg.lstsq`` in float64). Agreement: the largest
  difference of the scores, with and without residual.

The runs alternate (peer, noln, peer, noln, ...); the table gives every run's time and the
ratio of the best times. Machine load (``uptime``) is recorded before each run.

    python bench/peers.py --model ../shared/models/ref-gpt2-6L --jobs hellaswag,linearity \\
        --hellaswag-items 2000 --tokens 250000 --out docs/benchmarks/peers.md

A ``.gguf`` model is first converted once to a plain Hugging Face folder under ``--work`` (both
sides then load the same float32 folder).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HELLASWAG = SHARED / "data" / "hellaswag" / "validation.jsonl"
VAL = SHARED / "data" / "corpus" / "val.jsonl"


def uptime() -> str:
    load = os.getloadavg()
    return f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    """Wall time of a whole command; its output (stdout + stderr) for the log."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n"
                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return dt, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- the linearity peer


def load_microscope():
    """llm-microscope's ``functions`` module, or None where it is not installed. Its 0.0.7 package
    ``__init__`` fails (``from logit_lens import *``, an absolute import of its own module), so
    the module is loaded from its file, as a user would work around it."""
    spec = importlib.util.find_spec("llm_microscope")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "functions.py"
    mod_spec = importlib.util.spec_from_file_location("llm_microscope_functions", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def plain_procrustes(x, y) -> float:
    """METHODS.md's definition written plainly: centre, Frobenius-normalise, least squares."""
    import torch

    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    x, y = x / x.norm(), y / y.norm()
    a = torch.linalg.lstsq(x, y).solution
    return float(1 - (x @ a - y).square().sum())


def peer_linearity(model_path: str, data: str, tokens: int, ctx: int, out: str) -> None:
    """What a user writes with llm-microscope: run the model, keep every token's hidden states,
    score each consecutive pair in float64 (with residual; without residual: Y - X, which is
    what its ``procrustes_similarity_centered`` computes; in 0.0.7 that function returns the type
    ``float`` instead of the value, so it is called as ``procrustes_similarity(x, y - x)``)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from noln.data import load_blocks  # the same tokens as noln's run

    micro = load_microscope()
    score = micro.procrustes_similarity if micro is not None else plain_procrustes
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    blocks = load_blocks(data, tok, ctx, max_tokens=tokens)
    states: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for i in range(0, len(blocks), 8):
            ids = torch.from_numpy(np.asarray(blocks[i:i + 8], dtype=np.int64))
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            if not states:
                states = [[] for _ in hs]
            for k, h in enumerate(hs):
                states[k].append(h.reshape(-1, h.shape[-1]))
    hidden = [torch.cat(s) for s in states]
    rows = []
    for k in range(len(hidden) - 2):  # the last pair includes the final norm: skipped, as noln
        x, y = hidden[k].double(), hidden[k + 1].double()
        rows.append({"layer": k, "with_residual": score(x, y),
                     "without_residual": score(x, y - x)})
    Path(out).write_text(json.dumps({"peer": "llm-microscope" if micro else "plain torch",
                                     "n_tokens": int(blocks.size), "layers": rows}))


# ----------------------------------------------------------------------------- jobs


def hellaswag_job(args, model: str, work: Path) -> dict:
    from noln.lm_eval_tasks import TASKS_DIR

    if importlib.util.find_spec("lm_eval") is None:
        return {"skipped": "lm-eval is not installed (pip install 'noln[test]')"}
    n = args.hellaswag_items
    data = json.dumps({"hellaswag": str(HELLASWAG)})
    peer_cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                f"pretrained={model},dtype={args.peer_dtype}", "--include_path", str(TASKS_DIR),
                "--tasks", "noln_hellaswag", "--metadata", data,
                "--batch_size", "32", "--limit", str(n), "--device", "cpu",
                "--output_path", str(work / "lm_eval"), "--log_samples"]
    noln_json = work / "noln_hellaswag.json"
    noln_cmd = [sys.executable, "-m", "noln.cli", "eval", model, "--hellaswag", str(HELLASWAG),
                "--hellaswag-limit", str(n), "--json", str(noln_json), "--quiet", "--device", "cpu",
                *args.noln_eval_args.split()]
    runs = alternate(peer_cmd, noln_cmd, args.repeats)

    samples = sorted((work / "lm_eval").rglob("samples_noln_hellaswag_*.jsonl"),
                     key=lambda p: p.stat().st_mtime)[-1]
    peer_ll = {}
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        peer_ll[s["doc_id"]] = [r[0] for r in s["filtered_resps"]]
    results = sorted((work / "lm_eval").rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    got = json.loads(results[-1].read_text())["results"]["noln_hellaswag"]
    report = json.loads(noln_json.read_text())
    precision = report.get("precision", "fp32")
    mine = next(iter(report["models"].values()))["hellaswag"]

    import numpy as np

    from noln.evaluate.hellaswag import load_hellaswag, score_items
    from noln.loading import load_model
    from noln.precision import autocast

    net, tok = load_model(model)
    with autocast(precision, "cpu"):  # the log-likelihoods the noln command computed
        scores = score_items(net, tok, load_hellaswag(str(HELLASWAG), limit=n))
    peer = np.array([[float(v) for v in peer_ll[i]] for i in range(n)])
    diff = float(np.abs(peer - scores.loglik).max())
    agree = (f"acc {100 * got['acc,none']:.2f}% / {100 * mine['acc']:.2f}%, acc_norm "
             f"{100 * got['acc_norm,none']:.2f}% / {100 * mine['acc_norm']:.2f}% (peer / noln); "
             f"same predictions on {int((peer.argmax(1) == scores.pred).sum())}/{n} items; "
             f"max |Δ log-likelihood| {diff:.1e}")
    job = f"HellaSwag, first {n:,} items" + (f", noln in {precision}" if precision != "fp32"
                                              else "")
    peer_name = "lm-eval 0.4 (`--model hf`, batch 32" + (
        f", dtype {args.peer_dtype})" if args.peer_dtype != "float32" else ")")
    return {"job": job, "peer": peer_name,
            "peer_cmd": peer_cmd, "noln_cmd": noln_cmd, "runs": runs, "agreement": agree,
            "equal": (got["acc,none"] == mine["acc"] and got["acc_norm,none"] == mine["acc_norm"])}


def linearity_job(args, model: str, work: Path) -> dict:
    peer_json, noln_json = work / "peer_linearity.json", work / "noln_linearity.json"
    peer_cmd = [sys.executable, str(Path(__file__).resolve()), "--peer-linearity", model,
                str(VAL), str(args.tokens), str(args.ctx), str(peer_json)]
    noln_cmd = [sys.executable, "-m", "noln.cli", "linearity", model, "--data", str(VAL),
                "--tokens", str(args.tokens), "--ctx", str(args.ctx), "--json", str(noln_json),
                *args.noln_linearity_args.split()]
    runs = alternate(peer_cmd, noln_cmd, args.repeats)
    peer = json.loads(peer_json.read_text())
    mine = json.loads(noln_json.read_text())
    forward = mine.get("forward_precision", "fp32")
    diffs = {key: max(abs(a[key] - b[key]) for a, b in zip(peer["layers"], mine["layers"],
                                                           strict=True))
             for key in ("with_residual", "without_residual")}
    name = ("llm-microscope `procrustes_similarity`, float64" if peer["peer"] == "llm-microscope"
            else "plain torch (`lstsq`, float64; llm-microscope not installed)")
    agree = (f"{len(mine['layers'])} layers, {mine['n_tokens']:,} tokens each side; max |Δ score| "
             f"{diffs['with_residual']:.1e} with residual, {diffs['without_residual']:.1e} "
             "without")
    job = f"linearity, {args.tokens:,} tokens of val.jsonl, ctx {args.ctx}" + (
        f", noln's forward in {forward}" if forward != "fp32" else "")
    return {"job": job, "peer": name,
            "peer_cmd": ["python", "bench/peers.py", "--peer-linearity", "MODEL", "val.jsonl",
                         str(args.tokens), str(args.ctx), "OUT"],
            "noln_cmd": noln_cmd, "runs": runs, "agreement": agree,
            "equal": max(diffs.values()) < 1e-3}


def hellaswag_core_job(args, model: str, work: Path) -> dict:
    """Scoring alone, in this process: lm-eval's ``HFLM.loglikelihood`` (batch 32) on the
    (context, " " + ending) requests its HellaSwag task makes, against ``score_items``; same
    loaded weights, alternating, so start-up costs and slow drifts of the load drop out."""
    import numpy as np
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from noln.evaluate.hellaswag import load_hellaswag, score_items
    from noln.loading import load_model

    n = args.hellaswag_items
    items = load_hellaswag(str(HELLASWAG), limit=n)
    net, tok = load_model(model)
    lm = HFLM(pretrained=model, dtype="float32", batch_size=32, device="cpu")
    requests = [Instance("loglikelihood", {}, (it.ctx, " " + e), j, doc_id=i)
                for i, it in enumerate(items) for j, e in enumerate(it.endings)]
    runs: dict[str, list] = {"peer": [], "noln": [], "load": []}
    for r in range(args.repeats):
        for side in ("peer", "noln"):
            runs["load"].append(uptime())
            t = time.perf_counter()
            with torch.inference_mode():
                if side == "peer":
                    peer = np.array([ll for ll, _ in lm.loglikelihood(requests,
                                                                      disable_tqdm=True)])
                else:
                    mine = score_items(net, tok, items).loglik
            runs[side].append(time.perf_counter() - t)
            print(f"  {side} run {r + 1}: {runs[side][-1]:.1f} s", flush=True)
    peer = peer.reshape(n, 4)
    diff = float(np.abs(peer - mine).max())
    same = int((peer.argmax(1) == mine.argmax(1)).sum())
    return {"job": f"HellaSwag scoring only (one process, weights loaded), first {n:,} items",
            "peer": "lm-eval 0.4 `HFLM.loglikelihood`, batch 32",
            "peer_cmd": ["python", "bench/peers.py", "--jobs", "hellaswag-core"],
            "noln_cmd": ["python", "-m", "noln.cli", "(noln.evaluate.hellaswag.score_items)"],
            "runs": runs, "equal": same == n,
            "agreement": f"same acc prediction on {same}/{n} items; max |Δ log-likelihood| "
                         f"{diff:.1e}"}


def alternate(peer_cmd: list[str], noln_cmd: list[str], repeats: int) -> dict:
    runs: dict[str, list] = {"peer": [], "noln": [], "load": []}
    for r in range(repeats):
        for side, cmd in (("peer", peer_cmd), ("noln", noln_cmd)):
            load = uptime()
            dt, _ = timed(cmd, {"PYTHONWARNINGS": "ignore"})
            runs[side].append(dt)
            runs["load"].append(load)
            print(f"  {side} run {r + 1}: {dt:.1f} s (load {load})", flush=True)
    return runs


def gguf_to_folder(path: Path) -> Path:
    """The plain float32 HF folder noln converts a GGUF file to once (``noln.gguf.hf_folder``,
    cached by the file's sha256); both sides load it."""
    from noln.gguf import hf_folder

    return hf_folder(path, progress=False)


def fmt_runs(times: list[float]) -> str:
    return ", ".join(f"{t:.1f}" for t in times)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peer-linearity":
        model, data, tokens, ctx, out = sys.argv[2:7]
        peer_linearity(model, data, int(tokens), int(ctx), out)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF folder or .gguf file")
    ap.add_argument("--name", default=None, help="label in the table (default: folder name)")
    ap.add_argument("--jobs", default="hellaswag,linearity")
    ap.add_argument("--hellaswag-items", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=250_000)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--noln-linearity-args", default="",
                    help="extra options for noln linearity, e.g. '--precision mixed "
                    "--forward-precision auto'")
    ap.add_argument("--noln-eval-args", default="",
                    help="extra options for noln eval, e.g. '--precision auto'")
    ap.add_argument("--peer-dtype", default="float32",
                    help="lm-eval's dtype model argument (float32: the checkpoint's own)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "noln-peers")
    ap.add_argument("--out", type=Path, default=None, help="append the table to this Markdown")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model)
    if model.suffix == ".gguf":
        model = gguf_to_folder(model)
    name = args.name or Path(args.model).name
    rows = []
    for job in args.jobs.split(","):
        print(f"{job} on {name}", flush=True)
        work = args.work / f"{name}-{job}"
        work.mkdir(parents=True, exist_ok=True)
        run = {"hellaswag": hellaswag_job, "hellaswag-core": hellaswag_core_job,
               "linearity": linearity_job}[job]
        rows.append(run(args, str(model), work))
    import torch

    lines = [f"## {name}", "",
             f"Command: `{shlex.join(['python', 'bench/peers.py', *sys.argv[1:]])}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores "
             f"({platform.processor() or 'cpu'}), torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; load average (1 / 5 / "
             f"15 min) before each run is listed. Whole commands (load, tokenise, forward, score), "
             "wall time, runs alternating peer / noln; ratio of the best times.", "",
             "| job | peer | peer time (s, each run) | noln time (s, each run) | noln faster by "
             "| answers |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r.get('job', '?')} | skipped: {r['skipped']} | | | | |")
            continue
        ratio = min(r["runs"]["peer"]) / min(r["runs"]["noln"])
        lines.append(f"| {r['job']} | {r['peer']} | {fmt_runs(r['runs']['peer'])} | "
                     f"{fmt_runs(r['runs']['noln'])} | **{ratio:.2f}x** | {r['agreement']} |")
    lines.append("")
    for r in rows:
        if "skipped" in r:
            continue
        lines.append(f"- {r['job']}: load before each run (peer, noln, ...): "
                     f"{'; '.join(r['runs']['load'])}")
        lines.append(f"  - noln: `{shlex.join(['noln', *r['noln_cmd'][3:]])}`")
        peer = r["peer_cmd"][2:] if r["peer_cmd"][1] == "-m" else r["peer_cmd"]
        lines.append(f"  - peer: `{shlex.join(peer)}`")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
