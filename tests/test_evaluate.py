"""Evaluation: HellaSwag against a brute-force scorer, batched vs unbatched CE, faithfulness,
the comparison table, the commands, and the errors a user can make."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from noln.cli.evaluate import compare_cmd, eval_cmd
from noln.errors import NolnError
from noln.evaluate import cross_entropy
from noln.evaluate.compare import NO_LN, ORIGINAL, WITH_LN, compare_models
from noln.evaluate.faithfulness import evaluate_blocks, faithfulness
from noln.evaluate.hellaswag import (
    Item,
    Scores,
    encode_items,
    load_hellaswag,
    score_items,
    summarize,
)
from noln.evaluate.inputs import parse_sources, short_names
from noln.evaluate.loss import token_losses

from .conftest import overflow_on, shared_path

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two spinning
    OpenMP threads made these tests 10-100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ref_tok():
    from noln.pretrained import load_tokenizer

    return load_tokenizer(shared_path("models", "ref-gpt2-6L"))


def tiny(vocab: int, n_positions: int = 64, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=n_positions,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def hs_items() -> list[Item]:
    """Every 500th validation item, and one with non-ASCII endings (bytes != characters)."""
    items = load_hellaswag(shared_path("data", "hellaswag", "validation.jsonl"))
    sample = items[::500]
    sample.append(Item(ind=-1, ctx="She orders a", label=1,
                       endings=["café au lait.", "coffee.", "naïve crème brûlée.", "tea."]))
    return sample


@pytest.fixture(scope="module")
def blocks(ref_tok) -> np.ndarray:
    from noln.data import load_blocks

    return load_blocks(str(shared_path("data", "corpus", "val.jsonl")), ref_tok, 64,
                       max_tokens=12 * 64)


def brute_force_loglik(model, tokenizer, items: list[Item], n_ctx: int) -> np.ndarray:
    """One ending at a time, unpadded, full logits: the harness's definition written plainly."""
    out = np.zeros((len(items), 4))
    with torch.inference_mode():
        for i, item in enumerate(items):
            ctx = tokenizer(item.ctx, add_special_tokens=False)["input_ids"]
            for j, ending in enumerate(item.endings):
                cont = tokenizer(" " + ending, add_special_tokens=False)["input_ids"]
                whole = (ctx + cont)[-(n_ctx + 1):]
                logp = F.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
                targets = torch.tensor(whole[1:])
                out[i, j] = logp[torch.arange(len(targets)), targets][-len(cont):].sum().item()
    return out


# ----------------------------------------------------------------------------- HellaSwag


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hellaswag_matches_brute_force(ref_tok, hs_items, dtype):
    model = tiny(len(ref_tok), n_positions=96).to(dtype)  # 96: many items get cut from the left
    encoded = encode_items(hs_items, ref_tok)
    assert sum(len(e.ctx) + len(e.endings[0]) > 97 for e in encoded) >= 5
    scores = score_items(model, ref_tok, hs_items, batch_size=5)
    brute = brute_force_loglik(model, ref_tok, hs_items, 96)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(scores.loglik, brute, atol=tol, rtol=0)
    n_bytes = np.array([[len(e.encode()) for e in it.endings] for it in hs_items])
    assert (scores.n_bytes == n_bytes).all() and n_bytes[-1, 0] != len(hs_items[-1].endings[0])
    if dtype == torch.float64:  # exact predictions, exact accuracies
        labels = np.array([it.label for it in hs_items])
        assert (scores.pred == brute.argmax(1)).all()
        assert (scores.pred_norm == (brute / n_bytes).argmax(1)).all()
        result = summarize(scores)
        assert result.acc == np.mean(brute.argmax(1) == labels)
        assert result.acc_norm == np.mean((brute / n_bytes).argmax(1) == labels)
        assert result.n == len(hs_items)
        p = result.acc
        assert math.isclose(result.acc_stderr, math.sqrt(p * (1 - p) / (len(hs_items) - 1)))


class PlainLM(torch.nn.Module):
    """A causal LM that is not a transformers class: forward(input_ids) -> logits tensor."""

    def __init__(self, inner: GPT2LMHeadModel):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids).logits


def test_hellaswag_batch_size_and_model_kind_do_not_change_scores(ref_tok, hs_items):
    model = tiny(len(ref_tok), n_positions=96)
    one = score_items(model, ref_tok, hs_items, batch_size=1).loglik
    auto = score_items(model, ref_tok, hs_items).loglik
    plain = score_items(PlainLM(model).eval(), ref_tok, hs_items, batch_size=3).loglik
    np.testing.assert_allclose(one, auto, atol=1e-5, rtol=0)
    np.testing.assert_allclose(one, plain, atol=1e-5, rtol=0)


def test_hellaswag_on_reference_model_matches_brute_force():
    from noln.loading import load_model

    model, tok = load_model(shared_path("models", "ref-gpt2-6L"))
    items = load_hellaswag(shared_path("data", "hellaswag", "validation.jsonl"), limit=40)
    scores = score_items(model, tok, items)
    np.testing.assert_allclose(scores.loglik[:3], brute_force_loglik(model, tok, items[:3], 256),
                               atol=1e-4, rtol=0)
    assert (scores.loglik < 0).all() and (scores.n_tokens > 0).all()


def _count_unpacked(monkeypatch) -> list[int]:
    """Items scored one row per ending (the packed path scores one item that way as its check)."""
    import noln.evaluate.hellaswag as hs

    calls: list[int] = []
    plain = hs._score_rows

    def counting(model, rows, *args):
        calls.append(len(rows))
        return plain(model, rows, *args)

    monkeypatch.setattr(hs, "_score_rows", counting)
    return calls


def test_shared_context_equals_brute_force_on_the_reference_model(monkeypatch):
    """The packed scorer (context once, four masked endings with their own positions, logits
    only where an ending token is predicted) against one unpadded row per ending, item by
    item; every item packs, so only the check item is scored unpacked."""
    from noln.loading import load_model

    model, tok = load_model(shared_path("models", "ref-gpt2-6L"))
    items = load_hellaswag(shared_path("data", "hellaswag", "validation.jsonl"))[::997][:8]
    calls = _count_unpacked(monkeypatch)
    scores = score_items(model, tok, items, batch_size=3)
    assert calls == [1]
    np.testing.assert_allclose(scores.loglik, brute_force_loglik(model, tok, items, 256),
                               atol=1e-4, rtol=0)


def test_shared_context_equals_brute_force_on_llama_gqa_rotary(ref_tok, hs_items, monkeypatch):
    """Rotary positions and grouped-query attention: each ending must be rotated from the
    context's length, not from where it sits in the packed row. n_positions 96 also sends the
    items that would be cut from the left down the unpacked path in the same call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(ref_tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=96, rope_theta=100.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    calls = _count_unpacked(monkeypatch)
    scores = score_items(model, ref_tok, hs_items, batch_size=4)
    cut = sum(len(e.ctx) + max(map(len, e.endings)) > 97 for e in encode_items(hs_items, ref_tok))
    assert 0 < cut < len(hs_items) and sum(calls) == 1 + cut
    np.testing.assert_allclose(scores.loglik, brute_force_loglik(model, ref_tok, hs_items, 96),
                               atol=1e-4, rtol=0)


def test_under_bf16_autocast_the_packed_scorer_stays_on(monkeypatch):
    """bf16 rounds the packed and the unpacked row differently (0.03 nats on an ending of the
    reference model, against ~1e-6 in fp32): the packing check must judge by the dtype the
    matmuls compute in, or every bf16 evaluation silently falls back to one row per ending."""
    import warnings

    from noln.loading import load_model
    from noln.precision import autocast

    model, tok = load_model(shared_path("models", "ref-gpt2-6L"))
    items = load_hellaswag(shared_path("data", "hellaswag", "validation.jsonl"))[::997][:6]
    exact = score_items(model, tok, items).loglik
    calls = _count_unpacked(monkeypatch)
    with autocast("bf16", "cpu"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back warning
        bf16 = score_items(model, tok, items, share_context=True).loglik
    assert calls == [1]  # only the check item went unpacked
    gap = np.abs(bf16 - exact).max()
    assert 1e-3 < gap < 0.25  # larger than fp32's tolerance, well inside bf16's


class IgnoresMask(GPT2LMHeadModel):
    """A model that drops the attention mask and position ids: packing would be wrong."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return super().forward(input_ids=input_ids, **kwargs)


def test_a_model_that_ignores_the_packing_mask_is_scored_unpacked(ref_tok, hs_items):
    model = tiny(len(ref_tok), n_positions=256)
    broken = IgnoresMask(model.config).eval()
    broken.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match="unpacked"):
        got = score_items(broken, ref_tok, hs_items, share_context=True).loglik
    want = score_items(model, ref_tok, hs_items, share_context=False).loglik
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_hub_items_are_cleaned_like_the_harness(monkeypatch):
    import datasets

    raw = [{"ind": 7, "activity_label": "Cooking", "ctx_a": "[header] How to boil eggs.",
            "ctx_b": "then", "ctx": "ignored", "label": "2",
            "endings": ["a [title] b", "c  d", "e", "f"]}]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: raw)
    (item,) = load_hellaswag("hf")
    assert item.ctx == "Cooking: How to boil eggs. Then" and item.label == 2 and item.ind == 7
    assert item.endings[:2] == ["a. b", "c d"]


# ----------------------------------------------------------------------------- CE


def test_batched_ce_equals_unbatched(ref_tok, blocks):
    model = tiny(len(ref_tok))
    one = token_losses(model, blocks, batch_size=1)
    many = token_losses(model, blocks, batch_size=5)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=0)
    reports = evaluate_blocks({"m": model}, blocks, batch_size=7)
    assert reports["m"].ce.mean == pytest.approx(one.double().mean().item(), abs=1e-6)
    assert reports["m"].ce.n_tokens == blocks.shape[0] * 63 and reports["m"].ce.ctx == 64


@pytest.mark.parametrize("bad, needle", [
    (np.arange(64), "shape (64,)"),  # a token stream, not cut into blocks
    (np.ones((2, 2, 8), dtype=np.int64), "shape (2, 2, 8)"),
    (np.full((2, 8), 1.5), "float64 values, not token ids"),
    (np.zeros((2, 8), dtype=bool), "bool values"),
    (np.zeros((0, 8), dtype=np.int64), "no blocks"),
    (np.ones((2, 1), dtype=np.int64), "blocks of 1 token"),
    (np.full((2, 8), 600), "token id 600 is outside the vocabulary"),
    (np.full((2, 8), -1), "token id -1"),
    (np.ones((1, 65), dtype=np.int64), "longer than the context"),
    ([[1, 2, 3], [4, 5]], "ragged"),
])
def test_the_scorers_answer_malformed_blocks_with_one_line(bad, needle):
    """The Python API's scorers (CE, faithfulness, linearity, the linearize fit) check their
    token blocks as the CLI checks its flags: a NolnError naming the fix, never an IndexError
    from inside the embedding or a silent cast of floats to ids."""
    from noln.linearity.replace import fit_layers
    from noln.linearity.score import linearity_profile

    model = tiny(512)
    scorers = {"ce": lambda b: token_losses(model, b),
               "faithfulness": lambda b: faithfulness(model, model, b)}
    if not needle.startswith("blocks of 1"):  # hidden states of 1-token blocks have no flaw
        scorers |= {"linearity": lambda b: linearity_profile(model, b, geometry=False),
                    "linearize": lambda b: fit_layers(model, b, [0])}
    for name, score in scorers.items():
        with pytest.raises(NolnError, match=re.escape(needle)):
            score(bad)
            pytest.fail(f"{name} took {bad!r}")
    good = token_losses(model, torch.ones(2, 8, dtype=torch.int32))  # any integer type
    assert good.shape == (2, 7) and good.dtype == torch.float32


# ----------------------------------------------------------------------------- faithfulness


def test_faithfulness_to_itself_and_to_another_model(ref_tok, blocks):
    model = tiny(len(ref_tok))
    same = faithfulness(model, model, blocks, batch_size=5)
    assert same.kl == 0 and same.js < 1e-6 and same.top1 == 1 and same.ce_diff == 0
    plain = evaluate_blocks({"ref": model, "plain": PlainLM(model).eval()}, blocks, reference="ref")
    assert plain["plain"].norms is None  # no hidden states from a plain forward
    assert plain["plain"].faithfulness.kl < 1e-6 and plain["plain"].faithfulness.top1 == 1
    other = tiny(len(ref_tok), seed=1)
    f = faithfulness(other, model, blocks, batch_size=5)
    # brute force on the same tokens
    x = torch.from_numpy(np.asarray(blocks, dtype=np.int64))
    with torch.inference_mode():
        lp_ref = F.log_softmax(model(x).logits[:, :-1].double(), -1).flatten(0, 1)
        lp = F.log_softmax(other(x).logits[:, :-1].double(), -1).flatten(0, 1)
    kl = F.kl_div(lp, lp_ref, log_target=True, reduction="sum").item() / len(lp)
    log_m = torch.logaddexp(lp, lp_ref) - math.log(2)
    js = 0.5 * (F.kl_div(log_m, lp_ref, log_target=True, reduction="sum")
                + F.kl_div(log_m, lp, log_target=True, reduction="sum")).item() / len(lp)
    assert f.kl > 0.01 and math.isclose(f.kl, kl, rel_tol=1e-4)
    assert math.isclose(f.js, js, rel_tol=1e-4) and f.js < math.log(2)
    assert math.isclose(f.top1, (lp.argmax(-1) == lp_ref.argmax(-1)).double().mean().item())
    assert len(f.ce_diff_by_position) == 63
    assert math.isclose(float(np.mean(f.ce_diff_by_position)), f.ce_diff, rel_tol=1e-9)


def test_residual_norms_and_rare_tokens(ref_tok, blocks):
    model, other = tiny(len(ref_tok)), tiny(len(ref_tok), seed=1)
    reports = evaluate_blocks({"ref": model, "m": other}, blocks, reference="ref",
                              tokenizer=ref_tok, top_k=len(ref_tok))
    norms = reports["m"].norms
    assert norms.labels == ["embed", "block 1", "block 2"]
    x = torch.from_numpy(np.asarray(blocks, dtype=np.int64))
    seen = []
    handle = other.transformer.ln_f.register_forward_pre_hook(lambda _, a: seen.append(a[0]))
    with torch.inference_mode():
        hidden = other(x, output_hidden_states=True).hidden_states
    handle.remove()
    last = seen[0].norm(dim=-1)  # the residual entering ln_f, not ln_f's output
    assert math.isclose(norms.pos0[-1], last[:, 0].mean().item(), rel_tol=1e-5)
    assert math.isclose(norms.rest[-1], last[:, 1:].mean().item(), rel_tol=1e-5)
    assert math.isclose(norms.pos0[0], hidden[0][:, 0].norm(dim=-1).mean().item(), rel_tol=1e-5)
    rare = reports["m"].rare_tokens
    # every seen token listed: contributions add up to the mean CE gap, the top is the worst
    assert math.isclose(sum(t.contribution for t in rare.largest_gap),
                        reports["m"].faithfulness.ce_diff, rel_tol=1e-6, abs_tol=1e-9)
    assert sum(t.count for t in rare.highest) == blocks.shape[0] * 63
    assert rare.highest[0].ce == max(t.ce for t in rare.highest)
    assert rare.reference_mean == pytest.approx(reports["ref"].ce.mean)
    assert rare.median == pytest.approx(reports["m"].ce.median)


# ----------------------------------------------------------------------------- the table


def test_compare_models_table_json_markdown_plots(ref_tok, blocks, hs_items, tmp_path):
    models = {ORIGINAL: tiny(len(ref_tok)), WITH_LN: tiny(len(ref_tok), seed=1),
              NO_LN: tiny(len(ref_tok), seed=2)}
    result = compare_models(models, ref_tok, {"val": blocks}, hellaswag=hs_items[:6],
                            reference=ORIGINAL, top_k=3, progress=False)
    assert result.delta == (NO_LN, WITH_LN)
    data = json.loads(result.to_json(tmp_path / "r.json"))
    m = data["models"][NO_LN]
    assert set(m["ce"]["val"]) >= {"mean", "ci95", "median", "n_tokens", "n_chunks", "ctx"}
    assert set(m["hellaswag"]) >= {"acc", "acc_norm", "acc_stderr", "n"}
    assert set(m["faithfulness"]["val"]) >= {"kl", "js", "top1", "ce_diff"}
    assert data["models"][ORIGINAL]["faithfulness"] == {}
    ce_row = next(r for r in data["table"] if r["metric"] == "CE val (nats)")
    assert ce_row["delta"] == pytest.approx(m["ce"]["val"]["mean"]
                                            - data["models"][WITH_LN]["ce"]["val"]["mean"])
    md = result.to_markdown()
    assert md.startswith("| metric | original | fine-tuned with LN | no LN | no LN − "
                         "fine-tuned with LN |")
    assert "12 chunks of 64 tokens" in md and "HellaSwag acc (%)" in md
    files = result.save(tmp_path / "out")
    assert {p.name for p in files} >= {"comparison.md", "comparison.json",
                                       "residual_norms_val.png", "ce_diff_by_position_val.png"}
    assert all(p.stat().st_size > 0 for p in files)
    # the names checked before the work (noln.outputs: never over the user's file) are these
    from noln.evaluate.compare import report_files

    assert {p.name for p in files} == set(report_files(["val"]))
    assert result.save(tmp_path / "out") == files  # noln's own files: replaced on a re-run


def test_chunks_that_overflow_are_counted_and_the_rest_still_scored(ref_tok, blocks, tmp_path):
    """A model whose forward overflows on some chunks (one token's residual at inf after block
    0, as a runaway fixed-scale model gives): the CE is nan, and the result counts those chunks and
    scores the others exactly as on their own; the table says both, and only where a model
    overflowed. Beside other models, every model is also scored on the chunks none overflows
    on, and faithfulness, residual norms and rare tokens are taken over those: the numbers the
    same chunks give alone."""
    model = tiny(len(ref_tok))
    token = int(blocks[3, 10])
    hit = np.array([(b == token).any() for b in blocks])
    assert 0 < hit.sum() < len(blocks)
    clean = cross_entropy(model, blocks[~hit])
    overflow_on(model, model.transformer.h[0], token)
    ce = cross_entropy(model, blocks)
    assert math.isnan(ce.mean) and ce.overflowed == hit.sum()
    assert ce.finite_mean == pytest.approx(clean.mean, abs=1e-6)
    assert f"{ce.overflowed} of {len(blocks)} chunks overflow" in str(ce)
    control = tiny(len(ref_tok), seed=1)
    result = compare_models({NO_LN: model, WITH_LN: control}, ref_tok, {"val": blocks},
                            progress=False)
    md = result.to_markdown()
    assert "chunks that overflow val" in md and f"{clean.mean:.4f}" in md
    assert f"val: {hit.sum()} of {len(blocks)} chunks overflow in some model" in md
    table = json.loads(result.to_json(tmp_path / "r.json"))["table"]
    rows = {r["metric"]: r["values"] for r in table}
    assert rows["chunks that overflow val"] == {NO_LN: hit.sum(), WITH_LN: 0}
    # the two models on the same text: the control too is scored on the chunks the removal
    # kept finite, so the difference column compares like with like
    control_clean = cross_entropy(control, blocks[~hit]).mean
    shared = rows["CE val, the chunks no model overflows on"]
    assert shared[NO_LN] == pytest.approx(clean.mean, abs=1e-6)
    assert shared[WITH_LN] == pytest.approx(control_clean, abs=1e-6)
    assert abs(cross_entropy(control, blocks).mean - control_clean) > 1e-4  # (tells them apart)
    medians = rows["median CE val, the chunks no model overflows on"]  # not nan
    assert medians[NO_LN] == pytest.approx(clean.median, abs=1e-6)
    assert medians[WITH_LN] == pytest.approx(cross_entropy(control, blocks[~hit]).median,
                                             abs=1e-6)
    delta = {r["metric"]: r["delta"] for r in table}
    assert delta["CE val, the chunks no model overflows on"] == \
        pytest.approx(clean.mean - control_clean, abs=1e-6)
    # and against a reference: faithfulness over those chunks, finite, as on them alone
    with_ref = compare_models({"original": control, NO_LN: model}, ref_tok, {"val": blocks},
                              reference="original", progress=False)
    alone = compare_models({"original": control, NO_LN: tiny(len(ref_tok))}, ref_tok,
                           {"val": blocks[~hit]}, reference="original", progress=False)
    got = with_ref.models[NO_LN].blocks["val"]
    want = alone.models[NO_LN].blocks["val"]
    assert got.faithfulness.n_tokens == want.faithfulness.n_tokens == \
        (~hit).sum() * (blocks.shape[1] - 1)
    for key in ("kl", "js", "top1", "ce_diff", "ce_diff_ci95"):
        assert getattr(got.faithfulness, key) == \
            pytest.approx(getattr(want.faithfulness, key), rel=1e-5), key
    assert got.norms.pos0 == pytest.approx(want.norms.pos0, rel=1e-5)
    assert got.rare_tokens.mean == pytest.approx(want.rare_tokens.mean, rel=1e-6)
    fine = compare_models({WITH_LN: tiny(len(ref_tok), seed=1)}, ref_tok, {"val": blocks},
                          progress=False)
    assert "overflow" not in fine.to_markdown() and cross_entropy(tiny(len(ref_tok)),
                                                                   blocks).overflowed == 0


def test_the_paired_training_gap_leaves_out_steps_whose_batch_was_not_the_controls():
    """Removal minus control training CE over spans of steps: a step where the removal dropped
    a sequence, trained one clipped, replayed some or was restored by the guard is left out;
    a step logged twice counts as last trained; a step only one run has is left out."""
    from noln.report import paired_training_gap, training_gap_markdown

    control = [{"step": s, "loss": 3.0} for s in range(8)]
    removal = [{"step": s, "loss": 4.0 + s} for s in range(8)] + [
        {"event": "skipped", "step": 1}, {"event": "clipped", "step": 2},
        {"event": "guard", "step": 3}, {"event": "remove", "step": 6, "site": "final"},
        {"step": 4, "loss": 5.0, "replay": 2}, {"step": 9, "loss": 1.0},
        {"step": 7, "loss": float("nan")}, {"step": 5, "loss": 6.5}]  # 5 again, and last
    rows = paired_training_gap(removal, control, window=4)
    assert rows == [{"first": 0, "last": 3, "steps": 1, "no_ln": 4.0, "with_ln": 3.0,
                     "gap": 1.0},
                    {"first": 4, "last": 7, "steps": 2, "no_ln": (6.5 + 10.0) / 2,
                     "with_ln": 3.0, "gap": (6.5 + 10.0) / 2 - 3.0}]
    assert "| 4-7 | 2 | 8.2500 | 3.0000 | +5.2500 |" in training_gap_markdown(rows)


def test_models_are_named_by_as_much_of_their_path_as_tells_them_apart(tmp_path):
    """Table columns: a local model's last path part, or as many last parts as tell it from the
    others; two runs' checkpoints at the same step used to be named by their whole paths, which
    the table cut to the same prefix."""
    a, b = (tmp_path / run / "checkpoints" / "step-1500.pt" for run in ("c37", "c37-control"))
    for path in (a, b):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
    assert list(short_names([str(a), str(b)])) == ["c37/checkpoints/step-1500.pt",
                                                   "c37-control/checkpoints/step-1500.pt"]
    model = tmp_path / "c37" / "model"
    model.mkdir()
    assert list(short_names([str(model), "gpt2"])) == ["model", "gpt2"]
    assert list(short_names([str(a), str(model)])) == ["step-1500.pt", "model"]


def test_a_runs_ce_after_minus_before_is_taken_over_the_chunks_both_keep(ref_tok, blocks):
    """A removal's closing table (CE before / after, and after − before): where the norm-free
    model overflows on some chunks, the difference is over the chunks both measurements keep
    finite, and says how many; it used to read +nan (SmolLM2 attempt 36, 4 of 64 chunks)."""
    from noln.report import ce_rows, json_safe

    before = cross_entropy(tiny(len(ref_tok), seed=1), blocks)
    model = tiny(len(ref_tok))
    token = int(blocks[3, 10])
    hit = np.array([(b == token).any() for b in blocks])
    clean_after = cross_entropy(model, blocks[~hit]).mean
    clean_before = cross_entropy(tiny(len(ref_tok), seed=1), blocks[~hit]).mean
    overflow_on(model, model.transformer.h[0], token)
    after = cross_entropy(model, blocks)
    # as the run's summary.json holds them (nan as null)
    table = {"val": {"before": json_safe(before.to_dict()), "after": json_safe(after.to_dict())}}
    _, rows = ce_rows(table, reference=None, control="before")
    delta = rows[0][-1]
    assert delta.endswith(f" ({(~hit).sum()}/{len(blocks)} chunks)")
    assert float(delta.split()[0]) == pytest.approx(clean_after - clean_before, abs=1e-4)
    assert "nan" not in delta
    # no overflow: the plain difference of the means
    _, rows = ce_rows({"val": {"before": before.to_dict(), "after": before.to_dict()}},
                      reference=None, control="before")
    assert rows[0][-1] == "+0.0000"


def test_hellaswag_never_picks_an_ending_the_model_overflows_on():
    """An ending with a nan log-likelihood (the model overflowed) is never the prediction (a
    plain argmax picks the first nan); an item where all four overflow gets none and counts
    wrong; the result counts the items with any."""
    nan = float("nan")
    scores = Scores(loglik=np.array([[-5.0, nan, -4.0, -9.0],   # 2, not the nan
                                     [nan, -3.0, -2.0, -8.0],   # 2 by acc; by acc_norm 1
                                     [nan, nan, nan, nan],      # none
                                     [-1.0, -2.0, -3.0, -4.0]]),
                    n_tokens=np.ones((4, 4), int),
                    n_bytes=np.array([[1, 1, 1, 1], [1, 4, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]),
                    labels=np.array([2, 1, 0, 0]))
    assert scores.pred.tolist() == [2, 2, -1, 0]
    assert scores.pred_norm.tolist() == [2, 1, -1, 0]
    result = summarize(scores)
    assert result.overflowed == 3 and result.acc == 0.5 and result.acc_norm == 0.75
    assert "3 overflow" in str(result)


def test_hellaswag_padding_cannot_poison_a_row(ref_tok, hs_items):
    """A model that overflows on its eos token (a norm-free model can: SmolLM2's <|im_end|>
    alone at position 0 did) scores HellaSwag in batches exactly as item by item, with no
    item overflowing: padding holds the row's own first token, never eos, so no inf reaches
    the real positions through the attention's 0-weighted sum."""
    model = tiny(len(ref_tok), n_positions=96)
    eos = ref_tok.eos_token_id
    assert all(eos not in ref_tok.encode(it.ctx + "".join(it.endings)) for it in hs_items)
    overflow_on(model, model.transformer.h[0], eos)
    batched = score_items(model, ref_tok, hs_items, batch_size=5)
    alone = score_items(model, ref_tok, hs_items, batch_size=1)
    assert batched.overflowed == 0
    np.testing.assert_allclose(batched.loglik, alone.loglik, atol=1e-4, rtol=0)


def test_bf16_autocast_evaluation_is_recorded_and_close_to_fp32(ref_tok, blocks, hs_items,
                                                                monkeypatch):
    """--precision bf16 computes the forward passes under bf16 autocast (so the CE moves, a
    little), says so in the JSON and the table's notes; auto follows the hardware."""
    import noln.precision

    models = {"m": tiny(len(ref_tok))}
    args = dict(sources={"val": blocks}, hellaswag=hs_items[:6], progress=False)
    exact = compare_models(models, ref_tok, **args)
    bf16 = compare_models(models, ref_tok, precision="bf16", **args)
    ce, ce_bf16 = (r.models["m"].blocks["val"].ce.mean for r in (exact, bf16))
    assert ce != ce_bf16 and abs(ce - ce_bf16) < 0.01  # autocast took effect; the CE barely moved
    assert (exact.precision, bf16.precision) == ("fp32", "bf16")
    assert json.loads(bf16.to_json())["precision"] == "bf16"
    assert "computed in bf16 autocast" in bf16.to_markdown()
    assert "autocast" not in exact.to_markdown()
    for native, expect in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(noln.precision, "native_bf16", lambda device=None, n=native: n)
        assert compare_models(models, ref_tok, {}, hellaswag=hs_items[:1], progress=False,
                              precision="auto").precision == expect


# ----------------------------------------------------------------------------- commands


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("eval")(eval_cmd)
    app.command("compare")(compare_cmd)
    return app


def run(*args: str):
    return CliRunner().invoke(cli(), list(args), catch_exceptions=True)


def test_parse_sources():
    assert parse_sources(["val=a/b.jsonl", "c/wiki.jsonl", "Skylion007/openwebtext",
                          "wikitext:wikitext-2-raw-v1"]) == {
        "val": "a/b.jsonl", "wiki": "c/wiki.jsonl", "openwebtext": "Skylion007/openwebtext",
        "wikitext": "wikitext:wikitext-2-raw-v1"}
    with pytest.raises(NolnError, match="two --data sources are named 'val'"):
        parse_sources(["x/val.jsonl", "y/val.jsonl"])


def test_eval_and_compare_commands(tiny_model_dir, text_jsonl, tmp_path):
    hs = tmp_path / "hs.jsonl"
    hs.write_text("".join(json.dumps({"ctx": f"The {w} is", "endings": ["red.", "a dog.",
                                      "very big indeed.", "here."], "label": i % 4}) + "\n"
                          for i, w in enumerate(["car", "sky", "sea", "cat", "sun"])))
    r = run("eval", str(tiny_model_dir), "--data", f"docs={text_jsonl}", "--tokens", "2048",
            "--ctx", "32", "--hellaswag", str(hs), "--json", str(tmp_path / "e.json"),
            "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output
    assert "chunks of 32 tokens" in r.output
    data = json.loads((tmp_path / "e.json").read_text())
    (model,) = data["models"].values()
    assert model["ce"]["docs"]["ctx"] == 32 and model["ce"]["docs"]["n_chunks"] == 64
    assert model["hellaswag"]["n"] == 5
    r = run("compare", str(tiny_model_dir), str(tiny_model_dir), str(tiny_model_dir),
            "--data", str(text_jsonl), "--tokens", "1024", "--out", str(tmp_path / "cmp"),
            "--json", str(tmp_path / "c.json"), "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "c.json").read_text())
    assert set(data["models"]) == {ORIGINAL, WITH_LN, NO_LN}
    assert data["models"][NO_LN]["faithfulness"]["docs"]["kl"] == 0  # the same model
    assert data["models"][NO_LN]["faithfulness"]["docs"]["top1"] == 1
    assert (tmp_path / "cmp" / "comparison.md").exists()
    r = run("eval", str(tiny_model_dir), "--data", str(text_jsonl), "--tokens", "1024",
            "--device", "cpu", "--precision", "bf16")
    assert r.exit_code == 0, r.output
    assert "precision bf16 on cpu (as asked)" in r.output and "computed in bf16" in r.output
    r = run("eval", str(tmp_path / "missing"), "--data", str(text_jsonl), "--precision", "fp16")
    assert isinstance(r.exception, NolnError) and "unknown precision 'fp16'" in str(r.exception)


# ----------------------------------------------------------------------------- bad input


def _hs_file(tmp_path, records) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


GOOD = {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}


def test_hellaswag_missing_field(tmp_path):
    path = _hs_file(tmp_path, [GOOD, {"ctx": "x", "label": 1}])
    with pytest.raises(NolnError, match=r"bad\.jsonl:2: field 'endings' is missing"):
        load_hellaswag(path)


@pytest.mark.parametrize("label", [4, -1, "x", None])
def test_hellaswag_label_out_of_range(tmp_path, label):
    path = _hs_file(tmp_path, [GOOD, GOOD, {**GOOD, "label": label}])
    with pytest.raises(NolnError, match=r"bad\.jsonl:3: field 'label' is .*out of range"):
        load_hellaswag(path)


def test_hellaswag_wrong_endings_and_missing_file(tmp_path):
    with pytest.raises(NolnError, match=r":1: field 'endings' must be a list of 4"):
        load_hellaswag(_hs_file(tmp_path, [{**GOOD, "endings": ["a", "b"]}]))
    with pytest.raises(NolnError, match="does not exist"):
        load_hellaswag(tmp_path / "nope.jsonl")


@pytest.fixture
def offline(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_unknown_dataset_offline(offline, tiny_model_dir):
    with pytest.raises(NolnError, match="cannot load HellaSwag 'no-such-org/no-such-set'.*offline"):
        load_hellaswag("no-such-org/no-such-set")
    r = run("eval", str(tiny_model_dir), "--data", "no-such-org/no-such-set", "--device", "cpu")
    assert isinstance(r.exception, NolnError)
    assert "cannot load dataset 'no-such-org/no-such-set'" in str(r.exception)


def test_nonexistent_model_path(tmp_path):
    r = run("eval", str(tmp_path / "no-model"), "--data", "builtin", "--device", "cpu")
    assert isinstance(r.exception, NolnError) and "does not exist" in str(r.exception)
    r = run("eval", str(tmp_path / "no-model"))
    assert isinstance(r.exception, NolnError) and "nothing to evaluate" in str(r.exception)


def test_scoring_runs_gpt2s_tanh_gelu_as_one_fused_kernel(tiny_model_dir):
    """``fuse_activations`` swaps GPT-2's six-op gelu_new for torch's fused tanh GELU in every
    block, the logits stay equal to float rounding, and the models eval scores with are the
    fused ones; a model without such modules is left alone."""
    from transformers.activations import GELUTanh, NewGELUActivation

    from noln.evaluate.inputs import load_models
    from noln.loading import fuse_activations, load_model

    model, _ = load_model(tiny_model_dir)
    n_layer = model.config.n_layer
    x = torch.randint(0, 500, (2, 32))
    with torch.no_grad():
        before = model(x).logits
        assert fuse_activations(model) == n_layer
        after = model(x).logits
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert (before - after).abs().max().item() > 0  # a different kernel ...
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # ... the same function
    assert fuse_activations(model) == 0
    (scored, _), = load_models({"m": str(tiny_model_dir)}, torch.device("cpu")).values()
    assert sum(isinstance(m, GELUTanh) for m in scored.modules()) == n_layer
