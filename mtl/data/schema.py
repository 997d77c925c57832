"""What a ``manifest.json`` is made of, for the pixel pack (``mtl.data.manifest``) and the feature cache
(``mtl.features.manifest``): one pydantic base, the field types both use, and reading a file into a model so that a
manifest that does not match is one ``DataError`` naming the file and the field (``splits.train.shards[3].sha256``).

Fields a newer writer adds get defaults, and fields a reader does not know are kept (``extra="allow"``), so a pack
written by another version still loads and a manifest read and written again keeps what it held.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from mtl.errors import DataError

MANIFEST = "manifest.json"

Count = Annotated[int, Field(strict=True, ge=0)]
"""A non-negative integer (not a bool, not a float)."""
Positive = Annotated[int, Field(strict=True, ge=1)]
Sha256 = Annotated[str, Field(strict=True, pattern=r"^[0-9a-f]{64}$")]
Text = Annotated[str, Field(strict=True)]

M = TypeVar("M", bound="ManifestModel")


class ManifestModel(BaseModel):
    """Base of every manifest part: unknown fields kept (a newer writer's), so a rewrite loses nothing."""

    model_config = ConfigDict(extra="allow")


class SplitsManifest(ManifestModel):
    """A manifest with at least one split, each a list of shards: what `mtl shards verify` walks."""

    splits: dict[str, Any] = Field(min_length=1)

    def shards(self) -> list[Any]:
        """Every split's shards, in manifest order."""
        return [sh for s in self.splits.values() for sh in s.shards]


def field_error(field: str, what: str) -> PydanticCustomError:
    """A cross-field check's failure inside a model validator, naming ``field`` (relative to the model)."""
    return PydanticCustomError("manifest_field", "{field}: {what}", {"field": field, "what": what})


# Messages by pydantic error type; ``{got}`` is the value found.
_MESSAGES = {
    "missing": "missing",
    "int_type": "expected an integer, got {got}",
    "greater_than_equal": "expected an integer >= {ge}, got {got}",
    "string_type": "expected a string, got {got}",
    "string_pattern_mismatch": "expected a sha256 (64 lowercase hex digits), got {got}",
    "bool_type": "expected true or false, got {got}",
    "list_type": "expected a list, got {got}",
    "dict_type": "expected a mapping, got {got}",
    "model_type": "expected a mapping, got {got}",
    "model_attributes_type": "expected a mapping, got {got}",
    "literal_error": "expected {expected}, got {got}",
    "too_short": "expected at least {min_length} entry, got {got}",
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _where(loc: tuple, tags: frozenset[str]) -> str:
    """``('splits', 'train', 'shards', 3, 'sha256')`` -> ``splits.train.shards[3].sha256``; union tags dropped."""
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif item not in tags:
            out += f".{item}" if out else str(item)
    return out or "top level"


def describe(exc: ValidationError, tags: frozenset[str] = frozenset()) -> str:
    """pydantic's first error as ``field: what``."""
    err = exc.errors(include_url=False)[0]
    where, ctx = _where(tuple(err["loc"]), tags), err.get("ctx") or {}
    if err["type"] == "manifest_field":
        prefix = "" if where == "top level" else where + "."
        return f"{prefix}{ctx['field']}: {ctx['what']}"
    template = _MESSAGES.get(err["type"])
    if template is None:
        return f"{where}: {err['msg'][:1].lower()}{err['msg'][1:]}, got {_short(err.get('input'))}"
    return f"{where}: " + template.format(got=_short(err.get("input")), **ctx)


def read_json_model(root: Path, model: type[M], fmt: str, what: str, tags: frozenset[str] = frozenset()) -> M:
    """``root/manifest.json`` read into ``model`` (whose ``format`` must be ``fmt``); a DataError naming the file
    (and the field) otherwise. ``what``: the end of "is ROOT ..." when the file is missing."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: not found; is {root} {what}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level: expected a mapping, got {type(data).__name__}")
    if data.get("format") != fmt:
        raise DataError(f"{path}: format: expected {fmt!r}, got {data.get('format')!r}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise DataError(f"{path}: {describe(exc, tags)}") from None
