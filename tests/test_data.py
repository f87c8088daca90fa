import json

import numpy as np
import pytest

from noln.data import load_tokens, pack, tokenize
from noln.errors import NolnError
from noln.pretrained import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_documents_are_joined_by_eot_and_packed(tok):
    ids = tokenize(["hello world", "second doc"], tok)
    eot = tok.eos_token_id
    assert ids[-1] == eot and (ids == eot).sum() == 2
    assert list(ids) == [*tok.encode("hello world"), eot, *tok.encode("second doc"), eot]
    blocks = pack(np.arange(10), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_local_sources_jsonl_txt_folder_and_cache(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one two"}) + "\n\n" +
                                      json.dumps({"text": "three"}) + "\n")
    (tmp_path / "b.txt").write_text("four five six")
    both = load_tokens(str(tmp_path), tok)
    assert len(both) == len(load_tokens(str(tmp_path / "a.jsonl"), tok)) + \
        len(load_tokens(str(tmp_path / "b.txt"), tok))
    again = load_tokens(str(tmp_path), tok)
    assert isinstance(again, np.memmap) and np.array_equal(both, again)


def test_empty_dataset_is_a_clear_error(tmp_path, tok):
    f = tmp_path / "empty.jsonl"
    f.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"other": "x"}) + "\n")
    with pytest.raises(NolnError, match="has no text"):
        load_tokens(str(f), tok)


def test_bad_json_and_missing_path(tmp_path, tok):
    f = tmp_path / "bad.jsonl"
    f.write_text("{not json\n")
    with pytest.raises(NolnError, match=r"bad.jsonl:1 is not valid JSON"):
        load_tokens(str(f), tok)
    with pytest.raises(NolnError, match="does not exist"):
        load_tokens(str(tmp_path / "nope.jsonl"), tok)


def test_unknown_hub_dataset_offline_is_a_clear_error(tok):
    with pytest.raises(NolnError, match=r"cannot load dataset 'no-such-user/no-such-set'.*"
                                        r"local .jsonl"):
        load_tokens("no-such-user/no-such-set", tok, use_cache=False)


def test_a_hub_source_read_once_is_not_asked_about_again(tok, monkeypatch):
    """A Hub dataset read (and its blocks cached) leaves a marker, so the up-front check
    (``check_hub_dataset``) does not go to the Hub for it again: offline, cached blocks are
    read at once, as before the check existed."""
    import datasets

    import noln.data

    docs = [{"text": "a document from the Hub"}, {"text": "and another"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter(docs))
    marker = noln.data._hub_read_marker("org/fresh-set", "train")
    assert not marker.exists()
    ids = load_tokens("org/fresh-set", tok)
    assert marker.exists() and (np.asarray(ids) == tok.eos_token_id).sum() == 2
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset_builder",
                        lambda *a, **k: pytest.fail("asked the Hub about a source it read"))
    noln.data.check_source("org/fresh-set")


def test_too_little_text_for_one_block():
    with pytest.raises(NolnError, match="fewer than one block of 64"):
        pack(np.arange(10), 64)
