"""Report files written where the user says (``--json``, ``--csv``, ``--plot``, the files of
``noln eval/compare --out``): noln replaces only files it wrote itself.

Every report carries noln's mark, so a later command can tell its own file from the user's:

- JSON: a top-level ``"noln"`` entry (``{"version": ...}``);
- markdown: a first line ``<!-- written by noln VERSION -->`` (invisible when rendered);
- CSV: noln's own header row (the writer names it);
- a figure: the creator in its metadata (PNG ``Software``, PDF / SVG / EPS ``Creator``);
  formats without metadata (JPEG ...) carry none, so an existing one is never replaced.

``check_output_file`` runs before any model loads: a path that cannot be written, or an
existing file without the mark (the user's data, a notebook's figure, a report from a noln
older than the marks), is a one-line error naming the flag. The writers check again just
before they write, so nothing reaches a foreign file even where a name was not known up front.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backend_bases import FigureCanvasBase

from noln import __version__
from noln.errors import NolnError

CREATOR = f"noln {__version__}"
_MD_MARK = "<!-- written by noln"
# what a figure's metadata key is called per format, and the bytes it leaves in the file
_FIGURE_KEY = {".png": "Software", ".pdf": "Creator", ".svg": "Creator", ".eps": "Creator",
               ".ps": "Creator"}
_FIGURE_MARK = {".png": b"tEXtSoftware\x00noln ", ".pdf": b"/Creator (noln ",
                ".svg": b"<dc:title>noln ", ".eps": b"%%Creator: noln ",
                ".ps": b"%%Creator: noln "}
_MAX_READ = 256 * 2**20  # a report is small; a larger file is not one of noln's


# the files an hf or clean export holds (model, config, tokenizer, noln.json), for an export
# written before noln.json listed them (noln.export writes them; noln.run knows them in a run)
_EXPORT_FILES = {"noln.json", "config.json", "generation_config.json", "model.safetensors",
                 "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                 "tokenizer.model", "chat_template.jinja"}


def export_file_name(name: str) -> bool:
    """Whether ``name`` is a file a noln export writes (its weights, config, tokenizer)."""
    return name in _EXPORT_FILES or (name.startswith("model-") and name.endswith(".safetensors"))


def written_by_noln(path: Path, csv_header: Sequence[str] | None = None,
                    kind: str | None = None) -> bool:
    """Whether the file at ``path`` carries noln's mark (module docstring): the mark of a
    ``kind`` of report ("json", "md", "figure"; a CSV by its ``csv_header``), or, by default,
    of the kind its suffix names. A report is replaced only by one of its kind: ``--json`` names
    no run's ``loss.png``."""
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_READ:
            return False
        data = path.read_bytes()
    except OSError:
        return False
    suffix = path.suffix.lower()
    text = data.decode("utf-8", errors="replace")
    if csv_header is not None:
        return next(csv.reader(text.splitlines()[:1]), None) == list(csv_header)
    kind = kind or ("figure" if suffix in _FIGURE_MARK else "md" if suffix == ".md" else "json")
    if kind == "figure":
        return suffix in _FIGURE_MARK and _FIGURE_MARK[suffix] in data
    if kind == "md":
        return text.startswith(_MD_MARK)
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("noln"), dict)


def check_output_file(path: Path | None, flag: str,
                      csv_header: Sequence[str] | None = None, kind: str | None = None) -> None:
    """``path`` can be written: its folder exists or can be made and is writable, it is not a
    folder, and it does not exist or is a report noln wrote. Checked before the work."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise NolnError(f"{flag} '{path}' is a folder: give a file name")
    parent = path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise NolnError(f"{flag} '{path}' cannot be written: '{existing}' is a file, not a "
                        "folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise NolnError(f"{flag} '{path}' cannot be written: no write permission in "
                        f"'{existing}'")
    if path.exists() and not os.access(path, os.W_OK):
        raise NolnError(f"{flag} '{path}' cannot be written: the file is read-only")
    if path.exists() and not written_by_noln(path, csv_header, kind):
        if kind is not None and written_by_noln(path):
            raise NolnError(f"{flag} '{path}' already exists and is another of noln's files, "
                            f"not a {kind.upper()} report: give {flag} a file name of its own")
        raise NolnError(f"{flag} '{path}' already exists and is not a noln report (noln "
                        "replaces only files that carry its mark): give a new file name, or "
                        "move that file away")


def check_figure_file(path: Path | None, flag: str) -> None:
    """``check_output_file`` for a figure, whose suffix must be a format matplotlib writes."""
    if path is None:
        return
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        raise NolnError(f"{flag} '{path}': a figure is written as {', '.join(formats)} "
                        f"(the file's suffix says which); e.g. {flag} plot.png")
    check_output_file(path, flag)


def check_output_dir(path: Path | None, flag: str) -> None:
    """``path`` is, or can be made as, a writable folder."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NolnError(f"{flag} '{path}' is a file, not a folder: give a folder")
    check_output_file(path / "x", flag)


def check_distinct_outputs(files: Sequence[tuple[str, Path | None]] = (),
                           folders: Sequence[tuple[str, Path | None, Sequence[str]]] = ()
                           ) -> None:
    """No two output flags write the same file, and no file flag names a folder another flag
    writes into: ``files`` are ``(flag, path)``, ``folders`` ``(flag, folder, names)`` with the
    names the command may write in the folder. Checked before the work, so a clash is not found
    only when the second report meets the first (``--json X --out X``)."""
    written: dict[Path, str] = {}
    for flag, path in files:
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in written:
            raise NolnError(f"{written[resolved]} and {flag} both name '{path}': give each its "
                            "own file")
        written[resolved] = flag
    for flag, folder, names in folders:
        if folder is None:
            continue
        resolved = Path(folder).resolve()
        for path, other in written.items():
            if path == resolved or path in resolved.parents:
                raise NolnError(f"{other} '{path}' is the folder {flag} writes into: give "
                                f"{other} a file of its own")
            if path.parent == resolved and path.name in names:
                raise NolnError(f"{other} '{path}' is a file {flag} writes too: give {other} "
                                "another name")


def _replaceable(path: Path, csv_header: Sequence[str] | None = None,
                 kind: str | None = None) -> Path:
    """The last check, at the moment of writing (a name not known before the work)."""
    path = Path(path)
    if path.exists() and not written_by_noln(path, csv_header, kind):
        raise NolnError(f"'{path}' already exists and is not a noln report: nothing was "
                        "written over it; move it away and run again")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def marked_json(doc: dict[str, Any], indent: int = 2, **dumps: Any) -> str:
    """``doc`` as JSON with noln's mark first: ``{"noln": {"version": ...}, **doc}``."""
    return json.dumps({"noln": {"version": __version__}, **doc}, indent=indent, **dumps) + "\n"


def marked_markdown(text: str) -> str:
    """``text`` after noln's mark (an HTML comment, invisible when rendered)."""
    return f"{_MD_MARK} {__version__} -->\n{text}"


def write_json(doc: dict[str, Any], path: Path, indent: int = 2, **dumps: Any) -> Path:
    _replaceable(path, kind="json").write_text(marked_json(doc, indent, **dumps))
    return Path(path)


def write_markdown(text: str, path: Path) -> Path:
    _replaceable(path, kind="md").write_text(marked_markdown(text))
    return Path(path)


def write_csv(header: Sequence[str], rows: Iterable[Sequence[Any]], path: Path) -> Path:
    with _replaceable(path, header).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return Path(path)


def figure_metadata(path: Path) -> dict[str, str] | None:
    """``savefig``'s ``metadata`` naming noln the creator, where ``path``'s format keeps it."""
    key = _FIGURE_KEY.get(Path(path).suffix.lower())
    return {key: CREATOR} if key else None


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """``fig.savefig`` with noln as the figure's creator, where the format keeps metadata."""
    path = Path(path)
    fig.savefig(_replaceable(path, kind="figure"), dpi=dpi, metadata=figure_metadata(path))
    return path
