"""OpenMMLab config text (what mmseg saves in a checkpoint), read without running it.

mmseg 0.x saves ``meta["config"]`` and mmengine (mmseg 1.x) ``meta["cfg"]``: both are a
config's ``pretty_text``, Python source of the form ``name = dict(key=value, ...)``. It is
parsed with ``ast`` and only literals are evaluated (``dict(...)`` calls become dicts); a value
that would need code to run (a name, another call) becomes ``NotLiteral`` and is an error
only when a converter needs it (``setting``).
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ABSENT = object()  # pass as ``default`` to tell a setting left out from one set to None


@dataclass(frozen=True)
class NotLiteral:
    """A config value that is an expression, not a literal; ``text`` is its source."""

    text: str


def parse_config_text(text: str, source: str) -> dict[str, Any]:
    """The top-level assignments of config ``text`` as plain values (``NotLiteral`` where not literal).

    Raises ValueError naming ``source`` when the text is not Python.
    """
    try:
        tree = ast.parse(text)
    except SyntaxError as error:
        raise ValueError(f"{source}: its config text is not a Python config (line {error.lineno}: {error.msg}); "
                         "annseg reads the pretty_text that mmseg saves") from None
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = _value(node.value)
    return values


def _value(node: ast.expr) -> Any:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args \
            and all(k.arg is not None for k in node.keywords):
        return {k.arg: _value(k.value) for k in node.keywords}
    if isinstance(node, ast.Dict) and None not in node.keys:
        keys = [_value(k) for k in node.keys]  # type: ignore[arg-type]
        if not any(isinstance(k, (NotLiteral, dict, list)) for k in keys):
            return {k: _value(v) for k, v in zip(keys, node.values)}
    if isinstance(node, ast.List):
        return [_value(item) for item in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_value(item) for item in node.elts)
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return NotLiteral(ast.unparse(node))


def setting(config: Mapping[str, Any], key: str, source: str, default: Any = None) -> Any:
    """The value at dotted ``key`` (``"model.decode_head.channels"``), ``default`` when absent.

    A ``NotLiteral`` on the way is a ValueError naming the key: annseg never runs config code.
    """
    value: Any = config
    for part in key.split("."):
        if isinstance(value, NotLiteral):
            break
        if value is None:  # e.g. act_cfg=None: the setting below it is None too, not its default
            return None
        if not isinstance(value, Mapping):
            return default
        value = value.get(part, ABSENT)
        if value is ABSENT:
            return default
    if isinstance(value, NotLiteral) or _holds_expression(value):
        shown = value.text if isinstance(value, NotLiteral) else repr(value)
        raise ValueError(f"{source}: its config's {key} is {shown}, not a literal value; annseg does not run "
                         "config code, so it cannot read this setting")
    return value


def _holds_expression(value: Any) -> bool:
    if isinstance(value, Mapping):
        return any(_holds_expression(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_expression(v) for v in value)
    return isinstance(value, NotLiteral)
