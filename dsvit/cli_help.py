"""Help text of the ``dsvit`` command line: what ``--help`` shows beyond the options.

``dsvit train --help`` lists every key with the value the ``default`` recipe runs it with (the one
``dsvit train`` trains when no ``--config`` is given), not the dataclass defaults under it, and
each key's meaning. The meanings are the trailing ``# ...`` comments of the config dataclasses'
fields (``dsvit/config_sections.py`` and each plugin's ``config_class``), read from the source with
``ast`` + ``tokenize``: they are where the meanings were already written, so help and code cannot
drift apart and no field had to change. A key without a comment is shown with its value only.
Module docstrings used as descriptions are RST (``code``); argparse shows them as plain text.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
from functools import lru_cache

from dsvit import config as C

WIDTH = 100     # help lines wrap here
KEY_COLUMN = 36  # meanings start here when the key=value fits before it


@lru_cache(maxsize=None)
def field_comments(cls: type) -> dict:
    """field name -> its meaning: the comment ending the field's line (with full-line comments
    that continue it, indented further), else the comment lines right above the field."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):   # no source (a frozen build): names and values only
        return {}
    comments = {}   # line number -> (comment text, whether it is the line's only token)
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = not source.splitlines()[tok.start[0] - 1][:tok.start[1]].strip()
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), alone, tok.start[1])
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    body = ast.parse(source).body[0].body
    fields = [n for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    out = {}
    for node in fields:
        trailing = [comments[n][0] for n in range(node.lineno, node.end_lineno + 1)
                    if n in comments and not comments[n][1]]
        if trailing:
            n = node.end_lineno + 1   # continuation: full-line comments indented past the field
            while n in comments and comments[n][1] and comments[n][2] > node.col_offset and n not in code_lines:
                trailing.append(comments[n][0])
                n += 1
            out[node.target.id] = " ".join(trailing)
            continue
        above, n = [], node.lineno - 1
        while n in comments and comments[n][1]:
            above.insert(0, comments[n][0])
            n -= 1
        if len(above) > 1 or (above and len(above[0].split()) > 3):   # not a title ("# logging")
            out[node.target.id] = " ".join(above)
    return {k: v for k, v in out.items() if v}


def _entry(key: str, value, meaning: str, indent: str) -> list[str]:
    head = f"{indent}{key}={_show(value)}"
    if not meaning:
        return [head]
    pad = KEY_COLUMN if len(head) < KEY_COLUMN - 1 else len(head) + 2
    return textwrap.wrap(meaning, WIDTH, initial_indent=head.ljust(pad),
                         subsequent_indent=" " * KEY_COLUMN, break_on_hyphens=False)


def _show(value) -> str:
    if isinstance(value, str):
        return repr(value) if value == "" or " " in value else value
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def _plugin_summary(cls) -> str:
    doc = inspect.getdoc(inspect.getmodule(cls)) or inspect.getdoc(cls) or ""
    return plain_text(doc.split("\n\n")[0].replace("\n", " "))


def describe_keys(cfg: C.Config, plugin_classes: dict) -> str:
    """Every section's keys, one per line: ``key=value  meaning``; values from ``cfg``; a plugin
    without a section in ``cfg`` shows its config class's defaults."""
    lines = []
    for f in dataclasses.fields(C.Config):
        if f.name == "plugins":
            continue
        section = getattr(cfg, f.name)
        meanings = field_comments(type(section))
        lines.append(f"  {f.name}:")
        for g in dataclasses.fields(section):
            lines += _entry(g.name, getattr(section, g.name), meanings.get(g.name, ""), "    ")
    lines.append("  plugins (a method each; any plugins.NAME.KEY=VALUE adds NAME with these defaults,"
                 " enabled=true):")
    for name, cls in sorted(plugin_classes.items()):
        section = cfg.plugins[name] if name in cfg.plugins else cls.config_class()
        summary = _plugin_summary(cls)
        lines += textwrap.wrap(f"plugins.{name}: {summary}", WIDTH, initial_indent="    ",
                               subsequent_indent="      ")
        meanings = field_comments(cls.config_class)
        for g in dataclasses.fields(section):
            lines += _entry(g.name, getattr(section, g.name), meanings.get(g.name, ""), "      ")
    return "\n".join(lines)


def train_epilog(plugin_classes: dict) -> str:
    return ("--config defaults to the `default` recipe (dsvit/recipes/default.yaml); the values below "
            "are\nthe ones it trains with. Another recipe's: `dsvit train --config NAME --check`.\n"
            "recipes shipped: " + ", ".join(C.list_recipes()) +
            "\n\nconfig keys (override with section.key=value):\n" +
            describe_keys(C.load_config("default"), plugin_classes))


# section.key -> meaning, for the overrides `dsvit eval` applies to the run's config.yaml
EVAL_KEYS = {
    "data.root": "shard folder to evaluate on (default: the run's; 'synthetic': RUN_DIR/data)",
    "data.val_split": "split of data.root to evaluate",
    "data.workers": "decode processes",
    "data.corrupt": "skip (and count) or raise on a corrupt sample",
    "data.interpolation": "resize interpolation of the evaluation transform",
    "data.crop_pct": "centre-crop fraction of the evaluation transform",
    "train.eval_batch_size": "global evaluation batch",
}


def eval_epilog() -> str:
    lines = ["overrides (section.key=value) change the run's config.yaml for this evaluation; the "
             "model\nis the checkpoint's. The keys that apply:"]
    for key, meaning in EVAL_KEYS.items():
        lines += textwrap.wrap(meaning, WIDTH, initial_indent=f"  {key}".ljust(KEY_COLUMN),
                               subsequent_indent=" " * KEY_COLUMN)
    return "\n".join(lines)


def plain_text(rst: str) -> str:
    """RST inline markup as plain text: ``code`` -> code, :role:`x` -> x."""
    return re.sub(r"(?::[a-z]+:)?`{1,2}([^`]+)`{1,2}", r"\1", rst)
