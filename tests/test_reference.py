"""Must-show on the offline reference model (../shared): a full removal run with its control,
exports loadable by plain transformers whose validation CE matches the trained model's."""

import json

import torch
from transformers import AutoModelForCausalLM

import noln
from noln.data import load_blocks
from noln.evaluate.loss import cross_entropy

from .conftest import shared_path


def test_reference_model_full_removal_with_control(tmp_path):
    model = shared_path("models", "ref-gpt2-6L")
    corpus = shared_path("data", "corpus")
    out = tmp_path / "run"
    result = noln.remove_with_control(
        str(model), str(corpus / "train.jsonl"), out, eval_data=str(corpus / "val.jsonl"),
        steps=24, batch_size=4, lr=3e-4, warmup_steps=2, eval_tokens=16 * 256,
        export_format="both", checkpoint_every=100, progress=False)
    no_ln = result["no_ln"]
    assert len(no_ln["frozen"]) == 19 and "final" in no_ln["frozen"]  # every site, ln_f too
    table = result["table"]["heldout"]
    assert set(table) == {"original", "with LN (fine-tuned)", "without LN"}
    assert (out / "table.md").read_text().count("|") > 8
    # the hf export loads in plain transformers and gives the trained model's CE to 1e-4
    tok = noln.load_model(out / "model")[1]
    val = load_blocks(str(corpus / "val.jsonl"), tok, 256, max_tokens=16 * 256)
    trained, _ = noln.load_model(out)  # the run's own checkpoint (FakeNorms, frozen)
    ce_trained = cross_entropy(trained, val).mean
    assert abs(ce_trained - table["without LN"]["mean"]) < 1e-6
    plain = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert type(plain).__name__ == "GPT2LMHeadModel"
    assert abs(cross_entropy(plain, val).mean - ce_trained) < 1e-4
    clean = noln.load_clean(out / "model-clean")
    assert abs(cross_entropy(clean, val).mean - ce_trained) < 1e-4
    # the control kept its LayerNorm: its export is the plain model with the original eps
    control = AutoModelForCausalLM.from_pretrained(out / "control" / "model")
    assert control.config.layer_norm_epsilon == 1e-5
    meta = json.loads((out / "model" / "noln.json").read_text())
    assert len(meta["sigmas"]) == 19 and len(meta["events"]) == 19
    assert torch.isfinite(torch.tensor(list(meta["sigmas"].values()))).all()
