import json
import re

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


def test_a_local_source_without_text_is_refused_by_the_source_check(tmp_path, monkeypatch):
    """``check_source`` (what every command runs before it loads a model) reads a local source
    up to its first document: empty, blank, all-empty 'text' fields or a bad line before the
    first text are one line then, not after the model has loaded; a file with text is read no
    further than its first document."""
    from noln import data
    from noln.data import check_source

    cases = {"empty.jsonl": ("", "has no text (0 tokens)"),
             "blank.txt": ("\n \n", "has no text (0 tokens)"),
             "fields.jsonl": ('{"text": ""}\n{"other": 1}\n', "has no text (0 tokens)"),
             "typed.jsonl": ('{"text": 5}\n{"text": "later"}\n', "'text' is a int"),
             "nul.txt": ("a\0b", "is not a text file")}
    for name, (content, error) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(NolnError, match=re.escape(error)):
            check_source(str(tmp_path / name))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "folder" / "b.txt").write_text("some text")
    check_source(str(tmp_path / "folder"))  # the second file has text
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "first"}\n' + "{not json\n")  # (the read finds line 2 later)
    read: list[str] = []
    real = data._file_documents
    monkeypatch.setattr(data, "_file_documents",
                        lambda path: (read.append(d) or d for d in real(path)))
    check_source(str(good))
    assert read == ["first"]


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
