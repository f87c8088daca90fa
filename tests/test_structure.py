"""The shape of the code: imports form no circle, the library never imports the CLI, imports sit
at the top of modules, and the command line is generated from the config schema."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from noln.config import PretrainConfig, RemoveConfig, flag_of

SRC = Path(__file__).resolve().parents[1] / "src" / "noln"

# imports a library module may make inside a function, and why: optional extras (pip extras
# `interop` and `gguf`), capabilities a torch build may lack (torch.distributed, dynamo), and a
# transformers API that only some versions have
DEFERRED = {
    "gguf": "optional extra",
    "transformers.integrations.ggml": "needs the gguf extra",
    "transformer_lens": "optional extra",
    "nnsight": "optional extra",
    "lm_eval": "optional extra",
    "torch.distributed": "only under a launcher; not in every torch build",
    "torch._dynamo": "only with --compile",
    "transformers.utils.output_capturing": "transformers >= 5 only",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(mods: dict[str, Path]):
    """``(module, imported noln module or third-party name, lineno, inside a function)``."""
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        inner = {id(n) for f in ast.walk(tree)
                 if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                 for n in ast.walk(f) if isinstance(n, ast.Import | ast.ImportFrom)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from noln.arch import install` -> noln.arch; `from noln import x` -> noln.x
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods
                           else node.module for a in node.names]
            else:
                continue
            for target in targets:
                yield name, target, node.lineno, id(node) in inner


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, target, _, _ in _imports(mods):
        if target in mods and target != name:
            graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_circle():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_circle():
    """The test above can fail: a constructed circle is found."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_never_imports_the_cli():
    offenders = [(m, t) for m, t, _, _ in _imports(_modules())
                 if t.startswith("noln.cli") and not m.startswith("noln.cli")]
    assert not offenders, offenders


def test_imports_sit_at_the_top_except_optional_extras_and_the_cli():
    """Inside a function, a library module imports only what ``DEFERRED`` lists; the CLI
    (``noln.cli``) imports the library when a command runs, so ``noln --help`` and a bad value
    are answered before torch loads."""
    offenders = [f"{m}:{line} imports {t}" for m, t, line, inner in _imports(_modules())
                 if inner and not m.startswith("noln.cli")
                 and not t.startswith(tuple(DEFERRED))]
    assert not offenders, "\n".join(offenders)


def _loaded_by(module: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` importing ``module`` loads, in a fresh process."""
    code = f"import sys, {module}; print(sorted(m for m in {names!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return ast.literal_eval(out.strip())


def test_the_command_line_starts_without_torch():
    assert _loaded_by("noln.cli", ("torch", "transformers")) == []


@pytest.mark.parametrize("args, error", [
    (["eval", "gpt2", "--data", "x", "--tokens", "-1"], "--tokens -1 is invalid"),
    (["eval", "gpt2"], "nothing to evaluate"),
    (["eval", "gpt2", "gpt2", "--data", "x"], "a model is named twice"),
    (["compare", "a", "b", "c", "--data", "x", "--ctx", "1"], "--ctx 1 is invalid"),
    (["compare", "a", "b", "c", "--hellaswag-limit", "5"], "nothing to compare on"),
    (["linearity", "gpt2", "--data", "x", "--batch-size", "0"], "--batch-size 0 is invalid"),
    (["remove", "gpt2", "--steps", "-1"], "--steps"),
])
def test_a_bad_value_is_answered_before_torch_loads(args, error):
    """A number out of range, a missing --data: one line from the command line alone (with
    torch loaded first they took ~3 s on an idle CPU, ~10 s on a busy one)."""
    code = ("import sys\nfrom noln.cli import main\ntry:\n    main(" + repr(args) + ")\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, 'transformers' in "
            "sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    assert error in done.stderr, done.stderr
    assert done.stdout.split() == ["False", "False"], done.stdout


def test_the_run_folder_module_reads_runs_without_transformers():
    """``noln status`` and the checkpoint notes read a run through ``noln.run`` only: it needs
    torch (to read a checkpoint's step) but no model code, so it answers in about a second
    (importing transformers and noln's families took ~4 s more)."""
    assert _loaded_by("noln.run", ("transformers", "noln.arch", "noln.export",
                                   "noln.pretrained")) == []


def test_the_list_of_commands_shows_each_description_as_one_paragraph():
    """`noln --help` lists each command with its docstring's first paragraph; the docstring's
    own line breaks broke sentences there ("step of steps, sites / frozen")."""
    from noln.cli import app

    for command in app.registered_commands:
        doc = command.callback.__doc__ or ""
        assert command.short_help == " ".join(doc.split("\n\n")[0].split()), command.name


def _help(command: str) -> str:
    return subprocess.run([sys.executable, "-m", "noln.cli", command, "--help"],
                          capture_output=True, text=True, check=True,
                          env={"COLUMNS": "250", "PATH": "", "TERM": "dumb"}).stdout


@pytest.mark.parametrize("command, schema, positional", [
    ("remove", RemoveConfig, {"model"}), ("pretrain", PretrainConfig, set())])
def test_help_lists_every_setting_of_the_schema(command, schema, positional):
    """The options are generated from the config: every setting with a flag is in --help with
    its description; the others are reachable as KEY=VALUE, which --help explains."""
    text = " ".join(_help(command).split())
    for name, field in schema.model_fields.items():
        flag = flag_of(name, schema)
        if name in positional:
            continue
        if flag is None:
            assert "KEY=VALUE" in text, name
            continue
        assert flag in text, f"{flag} missing from noln {command} --help"
        if name != "progress":  # --quiet says 'no progress bar'
            words = " ".join(str(field.description).split())[:40]
            assert words in text, f"{flag}: its description is not the schema's"


def test_every_setting_has_one_resume_rule():
    """A new setting says, in config.py beside its field, whether --resume may change it."""
    from noln.config import (
        RESUME_CHANGES_OBJECTIVE,
        RESUME_CHANGES_SCHEDULE,
        RESUME_FIXED,
        RESUME_MAY_CHANGE,
    )

    rules = (RESUME_FIXED, RESUME_MAY_CHANGE, RESUME_CHANGES_OBJECTIVE, RESUME_CHANGES_SCHEDULE)
    for name in RemoveConfig.model_fields:
        if name == "out":  # a resumed run stays in its folder
            continue
        assert sum(name in rule for rule in rules) == 1, f"{name}: give it one --resume rule"


# flags the README shows for other programs' command lines (lm_eval, torchrun)
OTHER_TOOLS_FLAGS = {"--model", "--tasks", "--metadata", "--standalone"}


def test_every_flag_the_readme_names_exists():
    """A `--flag` in the README is an option of some `noln` command or of a `bench/` script
    (or of lm_eval / torchrun, above). A flag the docs name and the CLI refuses cost a user a
    failed command (`--scale-noise` was documented; pairs are `key=value` settings)."""
    import re

    import typer.main

    from noln.cli import app

    known = {"--help", *OTHER_TOOLS_FLAGS}

    def options(command) -> None:
        for param in getattr(command, "params", []):
            known.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
        for sub in getattr(command, "commands", {}).values():
            options(sub)

    options(typer.main.get_command(app))
    for script in (SRC.parents[1] / "bench").rglob("*.py"):
        known.update(re.findall(r"""add_argument\(\s*["'](--[\w-]+)""", script.read_text()))
    readme = (SRC.parents[1] / "README.md").read_text()
    # noln's flags use hyphens; one with an underscore belongs to another tool (accelerate's)
    named = {f for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", readme) if "_" not in f}
    assert sorted(named - known) == []


def test_import_noln_reaches_every_submodule_the_readme_names():
    """`import noln` then `noln.evaluate.cross_entropy`, `noln.arch.install` ... in a fresh
    process, as the README writes them (the lazy API once knew only its own names); an
    unknown name is still an AttributeError."""
    code = ("import noln\n"
            "noln.evaluate.cross_entropy, noln.evaluate.faithfulness, noln.arch.install\n"
            "noln.train.Trainer, noln.schedule.build_schedule, noln.sinks.sink_neurons\n"
            "try:\n    noln.nope\nexcept AttributeError as e:\n    print('refused', e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "refused module 'noln' has no attribute 'nope'" in p.stdout
