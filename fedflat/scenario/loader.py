"""Load a scenario file into a validated ``Scenario``, with errors located by file, key and line."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fedflat.errors import ScenarioError
from fedflat.scenario.schema import Scenario, cross_checks

Path_ = tuple[str | int, ...]


@dataclass
class LoadedScenario:
    """A validated scenario plus where each key came from (for later error messages)."""

    scenario: Scenario
    file: str
    lines: dict[Path_, int] = field(default_factory=dict)
    overridden: set[Path_] = field(default_factory=set)

    def error(self, key: str, message: str) -> ScenarioError:
        """A ScenarioError for ``key`` located at its line (or at its nearest parent)."""
        return _error_at(self.file, self.lines, self.overridden, _split(key), message)


def _split(key: str) -> Path_:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def _error_at(file: str, lines: dict[Path_, int], overridden: set[Path_], path: Path_,
              message: str) -> ScenarioError:
    key = ".".join(str(p) for p in path)
    for i in range(len(path), 0, -1):
        if path[:i] in overridden:
            return ScenarioError(message, file=f"--set {'.'.join(map(str, path[:i]))}", key=key)
        if path[:i] in lines:
            return ScenarioError(message, file=file, key=key, line=lines[path[:i]])
    return ScenarioError(message, file=file, key=key)


def _construct(node: yaml.Node, path: Path_, lines: dict[Path_, int], file: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for knode, vnode in node.value:
            key = knode.value
            if not isinstance(key, str) or not isinstance(knode, yaml.ScalarNode):
                raise ScenarioError("keys must be plain names", file=file,
                                    line=knode.start_mark.line + 1)
            p = (*path, key)
            if key in out:
                raise ScenarioError(f"duplicate key {key!r}", file=file, key=".".join(map(str, p)),
                                    line=knode.start_mark.line + 1)
            lines[p] = knode.start_mark.line + 1
            out[key] = _construct(vnode, p, lines, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            items.append(_construct(item, (*path, i), lines, file))
        return items
    return yaml.SafeLoader("").construct_object(node, deep=True)


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[Path_, int]]:
    """Parse a YAML file into a dict and a map from key path to line number."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ScenarioError("scenario file not found", file=file) from None
    except IsADirectoryError:
        raise ScenarioError("is a folder, not a scenario file", file=file) from None
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario file: {exc.strerror}", file=file) from None
    try:
        # Decoded here, not with the locale's encoding: YAML files are UTF-8 (a BOM is allowed).
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ScenarioError(f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte offset "
                            f"{exc.start} cannot be decoded (save the file as UTF-8)",
                            file=file, line=line) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ScenarioError(f"YAML syntax error: {exc.problem or exc.context}", file=file,
                            line=line) from None
    except yaml.reader.ReaderError as exc:  # a control character (e.g. NUL) in the text
        line = text.count("\n", 0, exc.position) + 1
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        raise ScenarioError(f"not a text file: control character {char} at character "
                            f"{exc.position} is not allowed in YAML", file=file,
                            line=line) from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"YAML error: {exc}", file=file) from None
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"):
        # An empty file would silently run every default; ask for an explicit `{}`.
        raise ScenarioError("empty scenario (no keys); to run every default write `{}` or "
                            "`name: NAME`", file=file)
    lines: dict[Path_, int] = {}
    data = _construct(node, (), lines, file)
    if not isinstance(data, dict):
        raise ScenarioError("a scenario must be a mapping of keys", file=file, line=1)
    return data, lines


def parse_override(item: str) -> tuple[str, Any]:
    """Split 'a.b=value' into the key path and the YAML-parsed value."""
    if "=" not in item:
        raise ScenarioError(f"expected key.path=value, got {item!r}", file="--set")
    key, _, raw = item.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _apply_override(data: dict[str, Any], key: str, value: Any, overridden: set[Path_]) -> None:
    path = _split(key)
    node: Any = data
    for part in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            raise ScenarioError(f"cannot set {key}: {part} is not a block",
                                file=f"--set {key}", key=key)
        if not isinstance(node, dict | list):
            raise ScenarioError(f"cannot set {key}: {part} is not a block",
                                file=f"--set {key}", key=key)
    if (isinstance(node, list) and isinstance(path[-1], int)
            and path[-1] < len(node)) or isinstance(node, dict):
        node[path[-1]] = value
    else:
        raise ScenarioError(f"cannot set {key}", file=f"--set {key}", key=key)
    overridden.add(path)


def _suggest(model: type[BaseModel], path: Path_) -> str:
    cls: Any = model
    for part in path[:-1]:
        fld = cls.model_fields.get(part) if isinstance(part, str) else None
        if (fld is None or not isinstance(fld.annotation, type)
                or not issubclass(fld.annotation, BaseModel)):
            return ""
        cls = fld.annotation
    names = list(cls.model_fields)
    close = difflib.get_close_matches(str(path[-1]), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; allowed keys here: {', '.join(names)}"


def load_scenario(
    source: str | Path | dict[str, Any] | Scenario,
    overrides: dict[str, Any] | list[str] | None = None,
) -> LoadedScenario:
    """Load, override and validate a scenario.

    Args:
        source: a YAML path, a plain dict, or an already built Scenario.
        overrides: ``{"server.rounds": 5}`` or ``["server.rounds=5"]`` (as ``--set``).

    Raises:
        ScenarioError: naming the file, the key path and the line of the first problem.
    """
    if isinstance(source, Scenario):
        data, lines, file = source.model_dump(mode="python"), {}, "<scenario>"
    elif isinstance(source, dict):
        data, lines, file = _deepcopy(source), {}, "<dict>"
    else:
        data, lines = read_yaml(source)
        file = str(source)
    overridden: set[Path_] = set()
    items = overrides.items() if isinstance(overrides, dict) else (
        parse_override(o) for o in (overrides or []))
    for key, value in items:
        _apply_override(data, key, value, overridden)
    from_method = _expand_method(data, file, lines, overridden)
    data_section = data.get("data")
    if (isinstance(data_section, dict) and data_section.get("data_dir") is None
            and os.environ.get("FEDFLAT_DATA")):
        data_section["data_dir"] = os.environ["FEDFLAT_DATA"]
    elif data_section is None and os.environ.get("FEDFLAT_DATA"):
        data["data"] = {"data_dir": os.environ["FEDFLAT_DATA"]}
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc: Path_ = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _suggest(Scenario, loc)
        else:
            msg = err["msg"]
            if "input" in err and not isinstance(err["input"], dict | list):
                msg += f" (got {err['input']!r})"
        more = len(exc.errors()) - 1
        if more:
            msg += f" [and {more} more problem{'s' if more > 1 else ''}]"
        raise _error_at(file, lines, overridden, loc, msg) from None
    problems = cross_checks(scenario)
    if problems:
        key, msg = problems[0]
        path = _split(key)
        if path in from_method:  # the user did not write the key: the method preset did
            value = from_method[path]
            raise _error_at(file, lines, overridden, ("method",),
                            f"method {data['method']!r} sets {key}: {value}; {msg} (drop "
                            f"`method: {data['method']}`, or set {key} yourself to keep the "
                            "rest of the preset)")
        raise _error_at(file, lines, overridden, path, msg)
    return LoadedScenario(scenario=scenario, file=file, lines=lines, overridden=overridden)


def _merge_defaults(defaults: dict[str, Any], user: Any) -> Any:
    """``user`` on top of ``defaults`` (user keys win, nested blocks merge)."""
    if not isinstance(user, dict):
        return user if user is not None else _deepcopy(defaults)
    out = _deepcopy(defaults)
    for k, v in user.items():
        out[k] = _merge_defaults(out[k], v) if isinstance(out.get(k), dict) else v
    return out


def _leaf_paths(obj: Any, prefix: Path_) -> set[Path_]:
    if not isinstance(obj, dict):
        return {prefix}
    return set().union(set(), *(_leaf_paths(v, (*prefix, k)) for k, v in obj.items()))


def _has_path(data: Any, path: Path_) -> bool:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _expand_method(data: dict[str, Any], file: str, lines: dict[Path_, int],
                   overridden: set[Path_]) -> dict[Path_, Any]:
    """Fill the blocks a named method preset implies; keys the user set win.

    Returns:
        The key paths the preset filled (the user set none of them), with their values, so
        that a problem with one of them is reported at the ``method:`` line.
    """
    name = data.get("method")
    if name is None:
        return {}
    from fedflat.scenario.local_rule import PRESETS

    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), list(PRESETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _error_at(file, lines, overridden, ("method",),
                        f"unknown method {name!r}{hint}; known: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[name]
    client = data.setdefault("client", {})
    server = data.setdefault("server", {})
    if not isinstance(client, dict) or not isinstance(server, dict):
        return {}  # the schema reports the wrong type
    implied = (_leaf_paths(preset.get("oracle", {}), ("client", "oracle"))
               | _leaf_paths(preset.get("correction", {}), ("client", "correction"))
               | _leaf_paths(preset.get("server", {}), ("server",))
               | (_leaf_paths(preset["swa"], ("server", "swa")) if "swa" in preset else set()))
    filled = {path for path in implied if not _has_path(data, path)}
    client["oracle"] = _merge_defaults(preset.get("oracle", {}), client.get("oracle"))
    client["correction"] = _merge_defaults(preset.get("correction", {}), client.get("correction"))
    for key, value in preset.get("server", {}).items():
        server[key] = _merge_defaults(value, server.get(key)) if isinstance(value, dict) \
            else server.get(key, value)
    if "swa" in preset:
        server["swa"] = _merge_defaults(preset["swa"], server.get("swa"))
    values: dict[Path_, Any] = {}
    for path in filled:
        node: Any = data
        for part in path:
            node = node[part] if isinstance(node, dict) else None
        values[path] = node
    return values


def _deepcopy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj


def dump_scenario(scenario: Scenario) -> str:
    """The resolved scenario as YAML (every key, defaults filled in)."""
    return yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False)
