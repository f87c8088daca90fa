"""Streaming linearity score vs a straightforward reimplementation of the paper's method.

"paper": store every token's hidden states (float32), then per layer pair the official notebook's
``procrustes_similarity`` and ``procrustes_similarity_centered`` (centre, Frobenius-normalise,
SVD pseudo-inverse of X, float32). "stream": noln's float64 moments, accumulated batch by batch,
then closed-form scores (it also gets the held-out scores from the same pass).

Both consume the same hidden states: synthetic residual-stream chains (d=768, regenerated batch by
batch from fixed seeds, so the stored and the streamed values are identical) and the reference
model's hidden states (dumped once to a file and read back batch by batch). Each measurement
runs in its own process; peak memory is that process's peak RSS (VmHWM, reset before the first
batch) above its RSS at that point. Producing the hidden states (generation or reading) is timed
separately and left out of both methods' times.

    python bench/linearity_speed.py --out docs/benchmarks/linearity_speed.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REF_MODEL = ROOT.parent / "shared" / "models" / "ref-gpt2-6L"
REF_DATA = ROOT.parent / "shared" / "data" / "corpus" / "val.jsonl"
BATCH = 2048  # tokens per batch


# ----------------------------------------------------------------------------- sources


def synthetic_batches(n: int, d: int, n_states: int, seed: int = 0):
    """A chain h_0 -> h_1 -> ... of residual-like states: h_{k+1} = h_k + gelu(h_k W1) W2.

    Every batch comes from its own seed, so any consumer sees the same numbers.
    """
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scale = torch.logspace(-0.5, 0.5, d)
    scale[:2] = 30.0  # two outlier dimensions, as real residual streams have
    offset = torch.randn(d, generator=g) * 3
    w1 = [torch.randn(d, 2 * d, generator=g) / d**0.5 for _ in range(n_states - 1)]
    w2 = [torch.randn(2 * d, d, generator=g) / (2 * d) ** 0.5 for _ in range(n_states - 1)]
    for i, start in enumerate(range(0, n, BATCH)):
        gb = torch.Generator().manual_seed(seed * 100_003 + i + 1)
        h = (torch.randn(min(BATCH, n - start), d, generator=gb) @ mix) * scale + offset
        states = [h]
        for a, b in zip(w1, w2, strict=True):
            h = h + torch.nn.functional.gelu(h @ a) @ b
            states.append(h)
        yield states


def dump_model_states(n: int, path: Path) -> dict:
    """Write the reference model's hidden states on val.jsonl (all but the last, post-norm, state)
    to ``path``, batch after batch, so every measurement reads the very same numbers."""
    from noln.data import load_blocks
    from noln.loading import load_model

    model, tok = load_model(str(REF_MODEL))
    blocks = load_blocks(str(REF_DATA), tok, 256, max_tokens=n)
    sizes = []
    with torch.inference_mode(), path.open("wb") as f:
        for i in range(0, len(blocks), BATCH // 256):
            ids = torch.from_numpy(blocks[i:i + BATCH // 256].astype("int64"))
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states[:-1]
            stacked = torch.stack([h.reshape(-1, h.shape[-1]) for h in hs]).float()
            f.write(stacked.numpy().tobytes())
            sizes.append(stacked.shape[1])
    return {"path": str(path), "sizes": sizes, "states": stacked.shape[0], "d": stacked.shape[2]}


def file_batches(meta: dict):
    """Read the dumped states back, one batch at a time (a plain read, no memory map)."""
    import numpy as np

    with open(meta["path"], "rb") as f:
        for b in meta["sizes"]:
            count = meta["states"] * b * meta["d"]
            arr = np.fromfile(f, dtype=np.float32, count=count)
            yield list(torch.from_numpy(arr).view(meta["states"], b, meta["d"]).unbind(0))


# ----------------------------------------------------------------------------- methods


def procrustes(x: torch.Tensor, y: torch.Tensor) -> float:
    """The official notebook's procrustes_similarity (float32 SVD pseudo-inverse)."""
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    x = x / x.norm()
    y = y / y.norm()
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    a = vh.T * (1 / s)[None, ...] @ u.T @ y
    return float(1 - (x @ a - y).square().sum())


class Clock:
    """Wall and CPU (this process, all threads) seconds spent inside ``with clock:`` blocks; on
    a GPU, the device is synchronised at both ends so wall time covers the kernels."""

    def __init__(self, cuda: bool = False):
        self.wall = self.cpu = 0.0
        self.cuda = cuda

    def __enter__(self) -> Clock:
        if self.cuda:
            torch.cuda.synchronize()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


def run_paper(batches, dtype: torch.dtype, cuda: bool = False
              ) -> tuple[list[list[float]], Clock]:
    stored: list[list[torch.Tensor]] = []
    clock = Clock(cuda)
    for states in batches:  # producing a batch happens in the iterator, outside the clock
        with clock:
            stored.append([s.to(dtype) for s in states])
    with clock:
        chain = [torch.cat(col) for col in zip(*stored, strict=True)]
        del stored
        scores = [[procrustes(chain[k], chain[k + 1]),
                   procrustes(chain[k], chain[k + 1] - chain[k])] for k in range(len(chain) - 1)]
    return scores, clock


def run_stream(batches, precision: str, cuda: bool = False
               ) -> tuple[list[list[float]], Clock]:
    from noln.linearity.score import StreamingMoments, score_pairs

    moments = None
    clock = Clock(cuda)
    for i, states in enumerate(batches):
        with clock:
            if moments is None:
                moments = StreamingMoments(states[0].shape[1], pairs=range(len(states) - 1),
                                           precision=precision, device=states[0].device)
            moments.update(states, half=i % 2)
    with clock:
        scores = [[s.with_residual, s.without_residual] for s in score_pairs(moments)]
    return scores, clock


def status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Start VmHWM afresh (Linux >= 4.0), so setup does not count towards the method's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    if spec["source"] == "synthetic":
        batches = synthetic_batches(spec["n"], spec["d"], spec["states"])
    else:
        batches = file_batches(spec["file"])
    warm = torch.randn(64, 64, dtype=torch.float64)  # load the BLAS/LAPACK paths and buffers
    for dt in (torch.float32, torch.float64):
        w = warm.to(dt) @ warm.to(dt).T + torch.eye(64, dtype=dt)
        torch.linalg.eigh(w), torch.linalg.svd(w), torch.linalg.cholesky(w)
    cuda = spec.get("device") == "cuda"
    if cuda:  # batches made on the CPU, moved to the GPU outside the clock, like reading them
        batches = ([s.cuda() for s in states] for states in batches)
        w = torch.randn(512, 512, device="cuda")
        for dt in (torch.float32, torch.float64):
            torch.linalg.svd(w.to(dt)), torch.linalg.eigh(w.to(dt) @ w.to(dt).T)
        torch.cuda.synchronize()
    first = next(batches)  # generators built, first batch made: the baseline for memory
    before = torch.cuda.memory_allocated() / 2**20 if cuda else status_mb("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_peak()

    def all_batches():
        yield first
        yield from batches

    method = spec["method"]
    if method.startswith("stream"):
        scores, clock = run_stream(all_batches(), "mixed" if "mixed" in method else "float64",
                                   cuda)
    else:
        dtype = torch.float64 if method == "paper-float64" else torch.float32
        scores, clock = run_paper(all_batches(), dtype, cuda)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else status_mb("VmHWM")
    return {**spec, "scores": scores, "cpu_s": clock.wall if cuda else clock.cpu,
            "wall_s": clock.wall, "peak_mb": peak - before, "rss_before_mb": before}


def measure(spec: dict, repeat: int) -> dict:
    """The best of ``repeat`` runs, each in a fresh process (times: min; memory: max)."""
    # big blocks straight from and back to the OS, so RSS follows what is live
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                             capture_output=True, text=True, check=False, env=env)
        if out.returncode != 0:
            raise SystemExit(f"child failed: {spec}\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {**runs[0], "cpu_s": min(r["cpu_s"] for r in runs),
            "wall_s": min(r["wall_s"] for r in runs), "peak_mb": max(r["peak_mb"] for r in runs)}


# ----------------------------------------------------------------------------- report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16384, 131072])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--states", type=int, default=4, help="hidden states in a synthetic chain")
    ap.add_argument("--ref-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per measurement (1: CPU time is a fair measure of work "
                    "on a shared machine)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement (best kept)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: time on the GPU (wall time with synchronisation; peak memory "
                    "is the GPU's max_memory_allocated)")
    ap.add_argument("--out", type=Path, default=None, help="write a Markdown report here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    rows = []
    cases = [("synthetic", n) for n in args.sizes]
    if REF_MODEL.exists() and args.ref_tokens > 0:
        cases.append(("ref-gpt2-6L", args.ref_tokens))
    elif args.ref_tokens > 0:
        print(f"skipping the reference model: {REF_MODEL} not found")
    tmp = Path(tempfile.mkdtemp(prefix="noln-bench-"))
    for source, n in cases:
        base = {"source": source, "n": n, "d": args.d, "states": args.states,
                "threads": args.threads, "device": args.device}
        if source != "synthetic":
            base["file"] = dump_model_states(n, tmp / "ref_states.f32")
        methods = ("stream", "stream-mixed", "paper")
        res = {m: measure({**base, "method": m}, args.repeat) for m in methods}
        if n <= 16384:  # the exact answer, to show which of the two the difference is in
            res["paper-float64"] = measure({**base, "method": "paper-float64"}, args.repeat)
        s = res["stream"]
        for name, r in res.items():
            diff = max(abs(a - b) for ra, rb in zip(r["scores"], s["scores"], strict=True)
                       for a, b in zip(ra, rb, strict=True))
            rows.append({"source": source, "n": n, "pairs": len(s["scores"]), "method": name,
                         "cpu_s": r["cpu_s"], "wall_s": r["wall_s"], "peak_mb": r["peak_mb"],
                         "ratio": r["cpu_s"] / s["cpu_s"], "max_diff": diff,
                         "scores": r["scores"]})
            print(f"{source:12s} n={n:7d} {name:14s} cpu {r['cpu_s']:8.2f}s wall "
                  f"{r['wall_s']:8.2f}s peak +{r['peak_mb']:8.1f} MB  "
                  f"x{r['cpu_s'] / s['cpu_s']:6.2f}  max|diff vs stream| {diff:.2e}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        write_report(rows, args)


def write_report(rows: list[dict], args) -> None:
    cmd = " ".join(["python bench/linearity_speed.py", *sys.argv[1:]])
    gpu = args.device == "cuda"
    where = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}; times are wall "
             "seconds with the GPU synchronised, memory is the GPU's peak allocation above "
             "the first batch" if gpu else
             f"{args.threads} torch thread(s) per measurement, {platform.machine()}, "
             f"{os.cpu_count()} cores shared with other jobs (load average "
             f"{os.getloadavg()[0]:.1f} when the report was written); torch {torch.__version__}")
    lines = [
        "# Linearity score: streaming vs the paper's method" + (" (GPU)" if gpu else ""),
        "",
        f"Command: `{cmd}` (from the repository root; best of {args.repeat} runs; {where}).",
        "",
        "- **paper**: store every token's hidden states (float32), then per layer pair the "
        "official notebook's `procrustes_similarity` and `procrustes_similarity_centered` "
        "(two float32 SVDs of X per pair).",
        "- **paper-float64**: the same in float64: the exact answer, to show where a difference "
        "comes from (16k only).",
        "- **stream**: `noln.linearity.score` (float64 moments accumulated batch by batch, "
        f"{BATCH} tokens a batch, then closed-form in-sample *and* held-out scores).",
        "- **stream-mixed**: the same with each batch's products in float32 (of the shifted "
        "values) and float64 sums across batches (`--precision mixed`).",
        "",
        "Times exclude producing the hidden states (synthetic generation, or reading the "
        "reference model's states back from a file written once), the same for every method. "
        "CPU time (this process, all threads) is the measure of work: on a machine shared with "
        "other jobs, wall time also counts the waiting. "
        "Peak memory is the process's peak RSS (VmHWM, reset before the first batch) above its "
        "RSS at that point, each measurement in its own process. `max |Δ|` is the largest "
        "difference from the float64 streaming scores over all pairs, with and without "
        "residual.",
        "",
        f"| hidden states | n tokens | pairs | method | {'GPU' if gpu else 'CPU'} time (s) | "
        f"{'GPU' if gpu else 'CPU'} time / stream's | "
        "wall time (s) | peak memory (MB) | max \\|Δ\\| vs stream |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        src = f"synthetic d={args.d}" if r["source"] == "synthetic" else "ref-gpt2-6L, val.jsonl"
        lines.append(f"| {src} | {r['n']:,} | {r['pairs']} | {r['method']} | {r['cpu_s']:.2f} "
                     f"| {r['ratio']:.2f} | {r['wall_s']:.2f} | {r['peak_mb']:.0f} "
                     f"| {r['max_diff']:.1e} |")
    lines += ["", "Scores (with residual, without residual) per pair:", ""]
    for r in rows:
        pretty = ", ".join(f"({a:.6f}, {b:.6f})" for a, b in r["scores"])
        lines.append(f"- {r['source']} n={r['n']:,} {r['method']}: {pretty}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
