"""The bench scripts a closing note quotes: their arithmetic on inputs made here."""

import importlib.util
from pathlib import Path

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


def test_committed_run_configs_read_under_todays_schema():
    """The README sends users to these files (`noln remove --config FILE`): a schema change that
    breaks one must fail here, not in a user's hour-long run."""
    from noln.config import RemoveConfig

    root = BENCH.parent
    files = sorted((root / "docs" / "benchmarks").rglob("*.yaml")) + \
        sorted((root / "bench" / "gpu").glob("*.yaml"))
    assert len(files) >= 7, files
    for path in files:
        cfg = RemoveConfig.from_yaml(path)
        assert cfg.model.endswith(".gguf") and cfg.tokens, path


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
