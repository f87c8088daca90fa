"""Token sources -> one long stream of token ids -> fixed-length blocks.

A source is a Hugging Face dataset name (streamed), a local ``.jsonl`` (``text`` field),
``.txt`` file or a folder of them, or ``builtin`` (text every Python install carries: the
standard library's docstrings and the ``pydoc_data`` help topics). Documents are tokenised,
each followed by the end-of-text token, and the stream is cached on disk as a memmap keyed by
the source, the tokenizer and the token budget, so a second run does not re-tokenise.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
import numpy as np
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import GatedRepoError, HFValidationError

from noln.arch import context_length
from noln.errors import NolnError
from noln.hub import offline_reason, offline_unless_reachable

try:  # the help topics of `pydoc`; some distributions split pydoc_data out
    from pydoc_data.topics import topics as PYDOC_TOPICS
except ImportError:
    PYDOC_TOPICS = {}

BUILTIN = "builtin"
LOCAL_SUFFIXES = (".jsonl", ".json", ".txt")


def cache_dir() -> Path:
    root = os.environ.get("NOLN_CACHE") or Path.home() / ".cache" / "noln"
    return Path(root) / "tokens"


# ----------------------------------------------------------------------------- documents


def builtin_documents() -> Iterator[str]:
    """Docstrings of the standard library (read with ``ast``, nothing imported) and pydoc topics."""
    yield from (PYDOC_TOPICS[k] for k in sorted(PYDOC_TOPICS))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if rel[0] in {"test", "idlelib", "site-packages", "dist-packages", "lib2to3"}:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    yield doc


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise NolnError(f"no .jsonl, .json or .txt files in folder '{path}': point --data at text")
    return files


def read_jsonl(path: Path, expected: str) -> Iterator[tuple[int, object]]:
    """``(line number, record)`` of a JSON-lines file, blank lines skipped; a bad line is a
    NolnError naming the file, the line and ``expected`` (what each line should hold)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise NolnError(f"{path}:{lineno} is not UTF-8 text (byte {raw[e.start]:#04x} at "
                                f"column {e.start + 1}): save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise NolnError(f"{path}:{lineno} is not valid JSON ({e.msg}): expected "
                                f"{expected}") from None


def _file_documents(path: Path) -> Iterator[str]:
    if path.suffix in (".jsonl", ".json"):
        for lineno, record in read_jsonl(path, "one object with a 'text' field per line"):
            text = record.get("text") if isinstance(record, dict) else None
            if text is not None and not isinstance(text, str):
                raise NolnError(f"{path}:{lineno}: 'text' is a {type(text).__name__}, not a "
                                "string: each line needs {\"text\": \"...\"}")
            if text:
                yield text
    else:
        data = path.read_bytes()
        if b"\0" in data[:65536]:
            raise NolnError(f"'{path}' is not a text file (it holds NUL bytes: binary data?): "
                            "point --data at UTF-8 text")
        text = data.decode("utf-8", errors="replace")
        if text.count("\ufffd") > max(16, len(text) // 100):  # >1% undecodable: not UTF-8
            raise NolnError(f"'{path}' is not UTF-8 text ({text.count(chr(0xFFFD)):,} "
                            "undecodable bytes): save it as UTF-8")
        if text.strip():
            yield text


def _hub_name(source: str) -> tuple[str, str | None]:
    """``(dataset, config)`` of a Hub source: ``"wikitext:wikitext-103-raw-v1"``."""
    name, _, config = source.partition(":")
    return name, config or None


def _hub_read_marker(source: str, split: str) -> Path:
    """A file in noln's cache that says ``source``'s ``split`` was read from the Hub once."""
    return cache_dir() / "hub-read" / hashlib.sha256(f"{source}|{split}".encode()).hexdigest()[:20]


def check_hub_dataset(source: str, split: str = "train") -> None:
    """A Hub dataset the Hub says does not exist, or a config or split it does not have, is an
    error now, before a command loads any model (``noln eval`` loads its models first: the
    token blocks need their tokenizer). Asked once per process, and never for a source noln
    has read before (its blocks are cached, and it exists); a name found wrong is an error
    each time. Where the Hub cannot answer (offline) the read decides; it then fails at once
    with this answer instead of waiting on the Hub client's retries a second time.
    ``HF_HUB_OFFLINE=1``, or a Hub whose name does not resolve (``noln.hub``): nothing is
    asked."""
    offline_unless_reachable()
    if datasets.config.HF_HUB_OFFLINE or (source, split) in _ASKED or \
            _hub_read_marker(source, split).exists():
        return
    name, config = _hub_name(source)
    try:
        splits = datasets.load_dataset_builder(name, config).info.splits
    except HFValidationError:
        raise NolnError(f"'{source}' is neither a local path nor a Hugging Face dataset name "
                        "(ORG/NAME, or NAME:CONFIG): check it") from None
    except DatasetNotFoundError as e:
        # (datasets re-raises the gated error without its cause: its words say it)
        if isinstance(e.__cause__, GatedRepoError) or "gated dataset" in str(e):
            raise NolnError(f"dataset '{name}' is gated on the Hugging Face Hub: ask for access "
                            f"at https://huggingface.co/datasets/{name} and log in (`hf auth "
                            "login`)") from None
        raise NolnError(f"dataset '{name}' is not on the Hugging Face Hub (nor a local path): "
                        "check the name (a private dataset needs `hf auth login`), or pass a "
                        f"local .jsonl/.txt file or folder, or '{BUILTIN}'") from None
    except ValueError as e:
        msg = " ".join(str(e).split())
        if msg.startswith(("BuilderConfig '", "Config name is missing")):  # (it lists them)
            what = f"has no config '{config}'" if config else "has several configs"
            raise NolnError(f"dataset '{name}' {what} ({msg[:240]}): give one as "
                            f"{name}:CONFIG") from None
        splits = None  # anything else: the read says it, in full
    except Exception as e:  # noqa: BLE001 - not reachable now: the read says so, or finds
        _UNREACHABLE[source] = (time.monotonic(), e)  # the blocks in the cache
        splits = None
    if splits and split.split("[")[0] not in splits:  # (a card that lists none: read to see)
        raise NolnError(f"dataset '{name}' has no split '{split}': it has "
                        f"{', '.join(sorted(splits))}; choose one with --split")
    _ASKED.add((source, split))


# Hub sources this process asked the Hub about, and those it could not answer for (when, and
# its error: the read that follows fails at once; one a few minutes later asks again)
_ASKED: set[tuple[str, str]] = set()
_UNREACHABLE: dict[str, tuple[float, Exception]] = {}
_UNREACHABLE_FOR = 300.0  # seconds


def _hub_documents(source: str, split: str) -> Iterator[str]:
    name, config = _hub_name(source)
    offline_unless_reachable()
    try:
        when, error = _UNREACHABLE.get(source, (-math.inf, None))
        if time.monotonic() - when < _UNREACHABLE_FOR:  # a moment ago, after the Hub client's
            raise error  # retries
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        for record in ds:
            text = record.get("text")
            if text:
                yield text
    except NolnError:
        raise
    except Exception as e:  # network, missing dataset, missing split: all one fix for the user
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if offline_reason() is not None:  # read from the cache only: say why
            msg += f"; the Hub is not reachable: {offline_reason()}"
        wait = " (HF_HUB_OFFLINE=1 saves the wait on the Hub's retries)" if \
            isinstance(e, ConnectionError) and not datasets.config.HF_HUB_OFFLINE else ""
        raise NolnError(f"cannot load dataset '{name}' (split '{split}') from the Hugging Face Hub "
                        f"({msg}); offline, pass a local .jsonl/.txt file or folder, "
                        f"or '{BUILTIN}'{wait}") from None


def is_local(source: str) -> bool:
    return Path(source).exists() or source.endswith(LOCAL_SUFFIXES) or source.startswith(("/", "."))


def check_source(*sources: str | Path | None, split: str = "train") -> None:
    """A local source that does not exist, or a Hub dataset the Hub does not have, or not
    with ``split`` (``check_hub_dataset``), is an error now, before a command loads any model
    (None: not given)."""
    for source in map(str, filter(None, sources)):
        if source == BUILTIN:
            continue
        if not is_local(source):
            check_hub_dataset(source, split)
        else:
            _check_exists(source)
            _check_has_text(source)


def _check_exists(source: str) -> None:
    if not Path(source).exists():
        raise NolnError(f"data file or folder '{source}' does not exist: check the path")


def _check_has_text(source: str) -> None:
    """A local source holds text: read up to its first document (a bad line before it is
    that line's error), so an empty or malformed file is one line before any model loads,
    not after it."""
    for file in _local_files(Path(source)):
        if file.suffix not in (".jsonl", ".json"):
            with file.open("rb") as f:
                head = f.read(65536)
            if b"\0" in head:
                raise NolnError(f"'{file}' is not a text file (it holds NUL bytes: binary "
                                "data?): point --data at UTF-8 text")
            if head.strip():
                return
        if next(_file_documents(file), None) is not None:
            return
    raise NolnError(f"data source '{source}' has no text (0 tokens): give .jsonl lines with a "
                    "non-empty 'text' field, or a .txt file with text")


def iter_documents(source: str, split: str = "train") -> Iterator[str]:
    """Documents of ``source`` in a fixed order."""
    if source == BUILTIN:
        yield from builtin_documents()
    elif is_local(source):
        _check_exists(source)  # (check_source's first read is not needed again)
        path = Path(source)
        for file in _local_files(path):
            yield from _file_documents(file)
    else:
        yield from _hub_documents(source, split)


# ----------------------------------------------------------------------------- tokens


def _source_fingerprint(source: str, split: str) -> str:
    if source == BUILTIN:
        return f"builtin:{sys.version_info[:2]}"
    if is_local(source) and Path(source).exists():
        parts = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                 for p in _local_files(Path(source))]
        return "|".join(parts)
    return f"hub:{source}:{split}"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens (the fast backend directly when there is one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


EOT = "<|endoftext|>"


def separator_id(tokenizer) -> int | None:
    """The token that ends a document in pretraining: ``<|endoftext|>`` where the vocabulary
    has it, else eos. They differ in chat-tuned tokenizers (SmolLM2-Instruct's eos is
    ``<|im_end|>``, the end of a chat turn; its pretraining joined documents with
    ``<|endoftext|>``), and the text must be packed the way the model was trained."""
    eot = tokenizer.get_vocab().get(EOT)
    return eot if eot is not None else tokenizer.eos_token_id


def tokenize(docs: Iterable[str], tokenizer, max_tokens: int | None = None,
             batch_docs: int = 512) -> np.ndarray:
    """Token ids of ``docs``, each document followed by end-of-text (``separator_id``), cut at
    ``max_tokens``."""
    eot = separator_id(tokenizer)
    if eot is None:
        raise NolnError("the tokenizer has no end-of-text (eos) token to join documents with")
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
    chunks: list[np.ndarray] = []
    total = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal total
        for ids in encode_batch(tokenizer, batch):
            arr = np.asarray([*ids, eot], dtype=dtype)
            chunks.append(arr)
            total += len(arr)
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_docs:
            flush()
            if max_tokens is not None and total >= max_tokens:
                break
    if batch and (max_tokens is None or total < max_tokens):
        flush()
    ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    return ids[:max_tokens] if max_tokens is not None else ids


def load_tokens(source: str, tokenizer, max_tokens: int | None = None, split: str = "train",
                use_cache: bool = True) -> np.ndarray:
    """The token stream of ``source`` (memmapped from the cache when it was made before)."""
    key = hashlib.sha256(
        f"{_source_fingerprint(source, split)}|{tokenizer_fingerprint(tokenizer)}|{max_tokens}"
        .encode()).hexdigest()[:20]
    path = cache_dir() / f"{key}.npy"
    if use_cache and path.exists():
        try:
            ids = np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            path.unlink(missing_ok=True)  # a torn cache file: rebuild it
        else:  # (blocks cached before noln kept the marker: it is kept from now on)
            _mark_hub_read(source, split)
            return ids
    ids = tokenize(iter_documents(source, split), tokenizer, max_tokens)
    if len(ids) == 0:
        raise NolnError(f"data source '{source}' has no text (0 tokens): give a dataset with a "
                        "non-empty 'text' field")
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, ids)
        os.replace(tmp, path)
        _mark_hub_read(source, split)
        return np.load(path, mmap_mode="r")
    return ids


def _mark_hub_read(source: str, split: str) -> None:
    """A Hub source read (now or before): it exists, and is not asked about again."""
    if source != BUILTIN and not is_local(source):
        marker = _hub_read_marker(source, split)
        try:
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
        except OSError:  # a read-only cache (shared): the marker is only a hint
            pass


def pack(ids: np.ndarray, ctx: int) -> np.ndarray:
    """Cut a token stream into ``[n, ctx]`` blocks, dropping the remainder."""
    n = len(ids) // ctx
    if n == 0:
        raise NolnError(f"only {len(ids)} tokens: fewer than one block of {ctx}; give more text "
                        "or a shorter --ctx")
    return np.asarray(ids[: n * ctx]).reshape(n, ctx)


def load_blocks(source: str, tokenizer, ctx: int, max_tokens: int | None = None,
                split: str = "train") -> np.ndarray:
    """``[n, ctx]`` blocks of ``source``: what training and evaluation consume."""
    return pack(load_tokens(source, tokenizer, max_tokens, split), ctx)


def check_blocks(blocks, models: dict | None = None, min_ctx: int = 2) -> np.ndarray:
    """``blocks`` as the ``int64 [n, ctx]`` array every scorer reads, or one line saying what
    is wrong with them: not integers, not 2-D, no block, a block shorter than 2 tokens (no
    next token to score), longer than a model's context, or an id outside a model's
    vocabulary (``models``: ``{name: model}``; the data was tokenised for another model).
    ``min_ctx`` 1: hidden states only (linearity), no next token needed."""
    if hasattr(blocks, "detach"):  # a torch tensor, on any device
        blocks = blocks.detach().cpu().numpy()
    try:
        array = np.asarray(blocks)
    except ValueError:  # ragged lists
        raise NolnError("blocks are ragged: give one [n, ctx] array of token ids "
                        "(noln.data.load_blocks or pack(ids, ctx) cut them)") from None
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise NolnError(f"blocks hold {array.dtype} values, not token ids: give integer ids "
                        "(noln.data.load_blocks)")
    if array.ndim != 2:
        raise NolnError(f"blocks have shape {tuple(array.shape)}: give [n, ctx] token ids "
                        "(a 1-D stream: noln.data.pack(ids, ctx))")
    n, ctx = array.shape
    if n == 0:
        raise NolnError("no blocks to score: give at least one [1, ctx] block")
    if ctx < min_ctx:
        raise NolnError(f"blocks of {ctx} token cannot be scored (no next token): give ctx "
                        f"{min_ctx} or more")
    low, high = int(array.min()), int(array.max())
    if low < 0:
        raise NolnError(f"token id {low} in blocks: ids are >= 0")
    for name, model in (models or {}).items():
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if isinstance(vocab, int) and high >= vocab:
            raise NolnError(f"token id {high} is outside the vocabulary of model '{name}' "
                            f"({vocab} ids): the data was tokenised with another model's "
                            "tokenizer")
        longest = context_length(model, default=ctx)
        if ctx > longest:
            raise NolnError(f"blocks of {ctx} tokens are longer than the context of model "
                            f"'{name}' ({longest}): cut them to {longest} or less")
    return array.astype(np.int64, copy=False)

