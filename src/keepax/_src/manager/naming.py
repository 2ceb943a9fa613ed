"""Step directory names from a template such as ``"{step:08d}"`` or ``"epoch_{epoch}_{step}"``.

The template is checked once, when the manager is built: it must name ``{step}``, every
placeholder must be a plain identifier, and the text around the placeholders must make a valid
directory name. At save time the caller supplies exactly the template's other placeholders.
The step number never depends on parsing a name: the manager stores it in the manifest.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping
from typing import Any

from keepax._src.io import is_hidden_name
from keepax.errors import PolicyError

__all__ = ["DEFAULT_TEMPLATE", "RESERVED_NAMES", "NameTemplate", "check_name"]

DEFAULT_TEMPLATE = "{step:08d}"
"""Zero-padded steps: ``00001000``. Sorts in step order in a plain directory listing."""

RESERVED_NAMES = frozenset({"state", "metrics", "metadata", "force", "overwrite", "dtype",
                            "on_commit"})
"""Keyword arguments of ``save``/``event`` that cannot be placeholders."""


def check_name(name: str, template: str) -> str:
    """Returns ``name`` if it is usable as a step directory name, else raises PolicyError."""
    problem = None
    if name in ("", ".", ".."):
        problem = "is empty or a relative directory"
    elif "/" in name or "\\" in name or "\x00" in name:
        problem = "contains '/', '\\' or NUL"
    elif is_hidden_name(name):
        problem = "contains '.keepax-' (reserved for keepax's staging directories)"
    if problem is not None:
        raise PolicyError(
            f"step directory name {name!r} (from template {template!r}) {problem}; change the "
            "template or the placeholder values."
        )
    return name


@dataclasses.dataclass(frozen=True, init=False)
class NameTemplate:
    """A validated step name template.

    Attributes:
      template: The template text, e.g. ``"step_{step}_epoch_{epoch}"``.
      placeholders: The placeholders other than ``step``, in order of appearance.
    """

    template: str
    placeholders: tuple[str, ...]

    def __init__(self, template: str) -> None:
        if not isinstance(template, str):
            raise PolicyError(
                f"the step name template must be a string such as {DEFAULT_TEMPLATE!r}, got "
                f"{template!r}."
            )
        fields = _fields(template)
        if "step" not in fields:
            raise PolicyError(
                f"the step name template {template!r} has no {{step}} placeholder; every step "
                f"needs its own name, e.g. {DEFAULT_TEMPLATE!r} or 'step_{{step}}_{{epoch}}'."
            )
        reserved = sorted(set(fields) & RESERVED_NAMES)
        if reserved:
            raise PolicyError(
                f"the step name template {template!r} uses reserved placeholder(s) "
                f"{', '.join(reserved)} (keyword arguments of save); rename them."
            )
        object.__setattr__(self, "template", template)
        object.__setattr__(self, "placeholders", tuple(f for f in fields if f != "step"))
        # Catches bad format specs for the step ("{step:q}") and fixed text that cannot be a
        # name; user placeholders are checked when their values arrive.
        try:
            check_name(_SampleFormatter().format(template, step=0), template)
        except (ValueError, TypeError) as e:
            if isinstance(e, PolicyError):
                raise
            raise PolicyError(f"the step name template {template!r} cannot format: {e}") from None

    def format(self, step: int, values: Mapping[str, Any]) -> str:
        """The directory name of ``step`` with the given placeholder values.

        Raises:
          PolicyError: A placeholder of the template is missing from ``values``, ``values``
            holds names the template lacks, or the result is not a valid name.
        """
        missing = [name for name in self.placeholders if name not in values]
        unknown = sorted(set(values) - set(self.placeholders))
        if missing or unknown:
            problems = []
            if missing:
                problems.append(f"missing placeholder(s) {', '.join(missing)}")
            if unknown:
                problems.append(f"unknown placeholder(s) {', '.join(unknown)}")
            declared = ", ".join(self.placeholders) or "none besides step"
            raise PolicyError(
                f"{' and '.join(problems)} for the step name template {self.template!r} (it "
                f"declares: {declared}); pass each as a keyword argument, e.g. "
                f"save(step, state, {self.placeholders[0] if self.placeholders else 'x'}=...).",
                step=step,
            )
        try:
            name = self.template.format(step=step, **values)
        except (ValueError, TypeError, KeyError) as e:
            raise PolicyError(
                f"cannot format the step name template {self.template!r} with {dict(values)!r}: "
                f"{e}",
                step=step,
            ) from None
        return check_name(name, self.template)


class _SampleFormatter(string.Formatter):
    """Formats ``{step}`` for real and every user placeholder as ``x`` (whatever its spec)."""

    def get_value(self, key: Any, args: Any, kwargs: Any) -> Any:
        return kwargs["step"] if key == "step" else _SAMPLE

    def format_field(self, value: Any, format_spec: str) -> Any:
        return "x" if value is _SAMPLE else super().format_field(value, format_spec)


_SAMPLE = object()


def _fields(template: str) -> list[str]:
    """The placeholder names of a template, each checked to be a plain identifier."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise PolicyError(f"the step name template {template!r} is malformed: {e}.") from None
    names: list[str] = []
    for _, field, spec, _ in parsed:
        if field is None:
            continue
        if not field.isidentifier():
            raise PolicyError(
                f"placeholder {{{field}}} in the step name template {template!r} is not a plain "
                "name; write named placeholders such as {step} or {epoch} (no positions, "
                "attributes or indexes)."
            )
        if spec and ("{" in spec):
            raise PolicyError(
                f"placeholder {{{field}:{spec}}} in the step name template {template!r} nests "
                "placeholders; use a fixed format spec."
            )
        if field not in names:
            names.append(field)
    return names
