"""Configuration files: YAML (duplicate keys refused) or TOML, and the generated reference.

Every problem is one line naming the file and, where it can, the line (``ConfigError``).
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Any

from pydantic import BaseModel

from cgguard.config import Config, ConfigError, build


def _yaml_loader():
    """A SafeLoader that refuses duplicate keys: PyYAML keeps the last one silently, so a second
    ``watch:`` or ``min_factor:`` further down would quietly replace the first."""
    import yaml
    from yaml.constructor import ConstructorError

    class DuplicateKey(ConstructorError):
        def __init__(self, key: Any, first: Any, again: Any):
            super().__init__(None, None, f"duplicate key {key!r}", again)
            self.key, self.first_line, self.line = key, first.line + 1, again.line + 1

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    # '<<' merges are flattened by SafeLoader; keys next to a merge override it.
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.setdefault(key, key_node.start_mark)
                    except TypeError:
                        continue  # unhashable: SafeLoader reports it
                    if first is not key_node.start_mark:
                        raise DuplicateKey(key, first, key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return Loader, DuplicateKey


def load_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    if path.endswith(".toml"):
        import tomllib

        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    else:
        import yaml

        loader, duplicate_key = _yaml_loader()
        try:
            data = yaml.load(raw.decode("utf-8"), Loader=loader)  # noqa: S506 (a SafeLoader)
        except duplicate_key as e:
            key = repr(e.key)[:80]
            raise ConfigError(f"{path}: duplicate key {key} at line {e.line} (first at line {e.first_line})") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}: {first}") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def load(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    data = load_file(path) if path else {}
    return build(data, overrides, source=path or "flags")


def default_config_path() -> str | None:
    for p in (os.environ.get("CGGUARD_CONFIG"), "/etc/cgguard/config.yaml", "/etc/cgguard/config.toml"):
        if p and os.path.exists(p):
            return p
    return None


# -- reference -------------------------------------------------------------------------------
def reference_markdown() -> str:
    """The configuration reference, generated from the models (README embeds it; a test checks drift)."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                doc = ((ann.__doc__ or "").strip().splitlines() or [""])[0]
                lines.append(f"| `{key}` | section | | {doc} |")
                walk(ann, key + ".")
                continue
            tname = str(ann).replace("typing.", "").replace(" | ", " \\| ") if type(ann).__name__ == "UnionType" else getattr(ann, "__name__", str(ann))
            if isinstance(ann, type) and issubclass(ann, Enum):
                tname = " \\| ".join(m.value for m in ann)
            if f.default_factory is not None:
                default = f.default_factory()
            else:
                default = f.default
            if isinstance(default, Enum):
                default = default.value
            dtext = "none" if default is None else f"`{default!r}`" if not isinstance(default, str) else f"`{default}`"
            if dtext == "``":
                dtext = "`''`"
            lines.append(f"| `{key}` | {tname} | {dtext} | {f.description or ''} |")

    walk(Config, "")
    return "\n".join(lines) + "\n"
