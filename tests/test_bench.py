"""The bench scripts a closing note quotes: their arithmetic on inputs made here."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_summary_splits_a_log_into_phases_of_removals():
    run_summary = _module("run_summary")
    log = [{"step": s, "loss": 3.0 + s / 100, "grad_norm": 1.0, "site_aux": 0.1}
           for s in range(20)]
    log += [{"event": "remove", "step": s, "site": f"blocks.{i}.mlp_in", "probe_before": 5 + i}
            for i, s in enumerate((5, 8, 11, 14, 17))]
    rows = run_summary.phases(log, per_row=2)
    assert [r["steps"] for r in rows] == ["0-4", "5-10", "11-16", "17-19"]
    assert [len(r["sites"]) for r in rows] == [0, 2, 2, 1]
    assert [len(r["train"]) for r in rows] == [5, 6, 6, 3]
    assert run_summary.describe_sites(rows[1]["sites"]) == "2: blocks.0.mlp_in .. blocks.1.mlp_in"
    assert run_summary.describe_sites([]) == "none"


def test_run_summary_pairs_a_running_removal_with_its_control(tmp_path, monkeypatch, capsys):
    """``--control``: the paired training gap as far as both logs go, a changed batch left out."""
    run_summary = _module("run_summary")
    removal, control = tmp_path / "run", tmp_path / "run" / "control"
    control.mkdir(parents=True)
    log = [{"step": s, "loss": 4.0, "grad_norm": 1.0} for s in range(6)]
    log.append({"event": "skipped", "step": 1})
    (removal / "log.jsonl").write_text("\n".join(json.dumps(e) for e in log) + "\n")
    (control / "log.jsonl").write_text("\n".join(
        json.dumps({"step": s, "loss": 3.0 + s / 10, "grad_norm": 1.0}) for s in range(4)) + "\n")
    monkeypatch.setattr(sys, "argv", ["run_summary.py", str(removal), "--control", str(control),
                                      "--window", "2"])
    run_summary.main()
    out = capsys.readouterr().out
    assert "| 0-1 | 1 | 4.0000 | 3.0000 | +1.0000 |" in out  # step 1 was not the control's batch
    assert "| 2-3 | 2 | 4.0000 | 3.2500 | +0.7500 |" in out
    assert "| 4-5 |" not in out  # the control has not got there yet


def test_committed_run_configs_read_under_todays_schema():
    """The README sends users to these files (`noln remove --config FILE`): a schema change that
    breaks one must fail here, not in a user's hour-long run."""
    import yaml

    from noln.config import RemoveConfig, check_schedule_file

    root = BENCH.parent
    files = sorted((root / "docs" / "benchmarks").rglob("*.yaml")) + \
        sorted((root / "bench" / "gpu").glob("*.yaml"))
    assert len(files) >= 7, files
    schedules = 0
    for path in files:
        if "type" in yaml.safe_load(path.read_text()):  # a schedule file a config names
            check_schedule_file(path)
            schedules += 1
            continue
        cfg = RemoveConfig.from_yaml(path)
        assert cfg.model.endswith(".gguf") and cfg.tokens, path
        if cfg.schedule not in ("fixed", "adaptive"):  # named from the repository's root
            assert (root / cfg.schedule).is_file(), path
    assert schedules >= 1


def test_grad_share_names_the_parts_of_llama_and_gpt2():
    part = _module("grad_share").part
    assert part("model.embed_tokens.weight") == "embed"
    assert part("model.layers.0.input_layernorm.weight") == "L0 norm"
    assert part("model.layers.12.post_attention_layernorm.weight") == "L12 norm"
    assert part("model.layers.3.self_attn.v_proj.weight") == "L3 attn"
    assert part("model.layers.3.mlp.down_proj.weight") == "L3 mlp"
    assert part("model.norm.weight") == "final"
    assert part("transformer.h.2.ln_1.weight") == "L2 norm"
    assert part("transformer.h.2.attn.c_attn.weight") == "L2 attn"
    assert part("transformer.h.2.mlp.c_fc.bias") == "L2 mlp"
    assert part("transformer.wpe.weight") == "embed" and part("lm_head.weight") == "head"


def test_hellaswag_flops_counts_what_each_scorer_feeds_the_model():
    """The bound quoted in docs/BENCHMARKS.md: lm-eval's real tokens are every request's context
    plus ending minus its last token, noln's logit rows are the ending tokens, and the FLOPs
    follow from those counts and the model's shapes."""
    from noln.evaluate.hellaswag import encode_items, load_hellaswag
    from noln.pretrained import load_tokenizer
    from tests.conftest import shared_path

    flops = _module("hellaswag_flops")
    folder = shared_path("models", "ref-gpt2-6L")
    source = shared_path("data", "hellaswag", "validation.jsonl")
    r = flops.count(str(folder), str(source), limit=40, lm_eval_batch=8)
    encoded = encode_items(load_hellaswag(source, limit=40), load_tokenizer(folder))
    ending_tokens = sum(len(x) for e in encoded for x in e.endings)
    assert r["lm_eval"]["real_tokens"] == sum(len(e.ctx) + len(x) - 1
                                              for e in encoded for x in e.endings)
    assert r["noln"]["logit_rows"] == ending_tokens
    assert r["noln"]["real_tokens"] == sum(len(e.ctx) + ending_tokens_i - 4 for e, ending_tokens_i
                                           in ((e, sum(len(x) for x in e.endings))
                                               for e in encoded))
    assert r["lm_eval"]["body_tokens"] >= r["lm_eval"]["real_tokens"]
    # 6 blocks of 12 d^2 weights (d 256): 2 FLOPs a multiply-add; the unembedding d x vocab
    assert r["lm_eval"]["body"] == pytest.approx(r["lm_eval"]["body_tokens"] * 2 * 6 * 12
                                                 * 256**2 / 1e9)
    assert r["noln"]["unembedding"] == pytest.approx(ending_tokens * 2 * 256 * r["vocab"] / 1e9)
    assert 1.5 < r["bound"] < 3.5


def test_site_ratios_measure_each_token_against_its_frozen_scale_in_forward_order():
    """bench/site_ratios.py, the tool that found where SmolLM2's unclipped forward overflows:
    its ratio at the first site is the embedding's RMS over the frozen scale, computed here
    independently; its sites come in forward order; the clip it sets bounds what leaves."""
    import torch

    from noln.arch import install
    from tests.test_llama import VOCAB, tiny

    measure = _module("site_ratios").measure
    model = tiny("llama")
    adapter = install(model)
    for name in adapter.sites:
        adapter.site(name).norm.freeze(0.05)
    x = torch.randint(0, VOCAB, (2, 12))
    ratios = measure(model, adapter, x, clip=0.0)
    assert list(ratios) == ["blocks.0.attn_in_qk", "blocks.0.attn_in_v", "blocks.0.mlp_in",
                            "blocks.1.attn_in_qk", "blocks.1.attn_in_v", "blocks.1.mlp_in",
                            "final"]
    emb = model.model.embed_tokens(x).float()
    expected = (emb.pow(2).mean(-1) + model.config.rms_norm_eps).sqrt() / 0.05
    torch.testing.assert_close(ratios["blocks.0.attn_in_qk"][0], expected)
    assert all(finite for _, finite in ratios.values())
    assert expected.min() > 1.5  # so a clip of 1.5 acts on every token at block 0
    seen = {}
    norm = adapter.site("blocks.0.attn_in_v").norm
    hook = norm.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    ratios_clipped = measure(model, adapter, x, clip=1.5)
    hook.remove()
    torch.testing.assert_close(ratios_clipped["blocks.0.attn_in_v"][0], expected)  # the input
    weight = model.model.layers[0].input_layernorm.weight
    left = seen["out"] / weight  # what the site divides out: rms at most K
    assert left.pow(2).mean(-1).sqrt().max() <= 1.5 + 1e-4


def test_freeze_from_checkpoint_prunes_the_sink_circuit_first(tiny_model_dir, text_jsonl,
                                                              tmp_path):
    """bench/freeze_from_checkpoint.py --prune-sinks N --original M zeroes N neurons per block
    (the tiny GPT-2 has 2 blocks) and measures the CE after it; without --original it refuses
    before loading anything."""
    import subprocess

    import noln

    noln.remove_layernorm(str(tiny_model_dir), str(text_jsonl), tmp_path / "run", steps=6,
                          batch_size=4, ctx=32, eval_tokens=256, export_format="none",
                          progress=False)  # every site with a measured scale
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.pt")
    script = ["bench/freeze_from_checkpoint.py", ckpt, "--data", str(text_jsonl),
              "--blocks", "4", "--ctx", "32", "--roles", "mlp_in", "--clip", "0"]
    # (8 per block: the tiny model is near uniform, CE ~ln 500, and 3 moved it by < 5e-5 on
    # one CPU, below the 4 decimals printed)
    out = subprocess.run([sys.executable, *script, "--prune-sinks", "8", "--original",
                          str(tiny_model_dir)], capture_output=True, text=True, check=True).stdout
    assert "pruned 16 neurons (8 per block" in out
    before, after = (float(line.split("CE ")[1].split()[0].rstrip(":")) for line in
                     out.splitlines() if line.startswith((ckpt, "pruned")))
    assert before != after
    refused = subprocess.run([sys.executable, *script, "--prune-sinks", "3"],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "give --original MODEL" in refused.stderr


def test_where_gap_splits_a_gap_by_position_reference_ce_and_share():
    """bench/where_gap.py: a gap of 1 nat on the first 4 positions of one chunk and 0 elsewhere
    is 4 of 20 tokens; it sits in positions 1-4, in that chunk, in the worst 20% of tokens."""
    import torch

    where_gap = _module("where_gap")
    gap = torch.zeros(2, 10)
    gap[0, :4] = 1.0
    reference = torch.full((2, 10), 3.0)
    reference[0, :4] = 0.05
    out = where_gap.breakdown(gap, reference)
    assert out["gap"] == pytest.approx(0.2)
    assert out["by_position"] == pytest.approx({"1-1": 0.5, "2-4": 0.5, "5-10": 0.0})
    assert out["by_reference_ce"]["[0, 0.1)"] == pytest.approx({"tokens": 0.2, "gap": 1.0})
    assert out["by_reference_ce"]["[2, 5)"] == pytest.approx({"tokens": 0.8, "gap": 0.0})
    assert out["share_of_worst"]["20%"] == pytest.approx(1.0)
    assert out["share_of_worst"]["5%"] == pytest.approx(0.25)  # the worst 1 token of the 4
    assert out["tokens_worse"] == pytest.approx(0.2)
    assert out["chunk_gap"] == pytest.approx({"min": 0.0, "median": 0.2, "max": 0.4})


def test_sink_cost_reads_a_variant_with_and_without_its_blocks():
    """bench/sink_cost.py: ``K:F`` is every block, ``K:F@B1,B2`` those blocks only (what
    ``prune_blocks`` prunes)."""
    sink_cost = _module("sink_cost")
    assert sink_cost.parse_variant("4:0.25") == (4, 0.25, None)
    assert sink_cost.parse_variant("16:0@11,12") == (16, 0.0, [11, 12])
