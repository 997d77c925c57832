"""Field types for typed settings, as strict as a config should be: the config's sections and each task's loss
options (`mtl.tasks.options`) are read with the same rules.

pydantic's lax mode would read 1 or "yes" as True and "2" as 2, its strict mode would refuse 2.0 for an int and
"1e-4" for a float. So: a bool is true/false; an int is an int or a whole float; a float is a number or a numeric
string (YAML 1.1 reads 1e-4 as one), never a bool; a str is a str.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Strict


def _integral(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _yaml_float(v: Any) -> Any:  # YAML 1.1 reads "1e-4" as a string
    try:
        return float(v) if isinstance(v, str) else v
    except ValueError:
        return v


Int = Annotated[int, Strict(), BeforeValidator(_integral)]
Float = Annotated[float, Strict(), BeforeValidator(_yaml_float)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
