"""Step name templates: validated when built, placeholders checked when used."""

from __future__ import annotations

import pytest

from keepax._src.manager.naming import DEFAULT_TEMPLATE, NameTemplate
from keepax.errors import PolicyError


def test_default_template_zero_pads() -> None:
    names = NameTemplate(DEFAULT_TEMPLATE)
    assert names.placeholders == ()
    assert names.format(42, {}) == "00000042"


def test_user_placeholders_in_order_with_format_specs() -> None:
    names = NameTemplate("phase_{phase}_epoch_{epoch:03d}_step_{step}")
    assert names.placeholders == ("phase", "epoch")
    assert names.format(7, {"phase": "warmup", "epoch": 2}) == "phase_warmup_epoch_002_step_7"


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("ckpt", "no {step}"),
        ("{epoch}", "no {step}"),
        ("{0}_{step}", "not a plain name"),
        ("{}_{step}", "not a plain name"),
        ("{step.real}", "not a plain name"),
        ("{step[0]}", "not a plain name"),
        ("{step:{width}}", "nests"),
        ("{step:q}", "cannot format"),
        ("run/{step}", "contains '/'"),
        ("{step}.keepax-x", "keepax"),
        ("{step", "malformed"),
        ("{metrics}_{step}", "reserved"),
        (7, "must be a string"),
    ],
)
def test_invalid_templates_are_refused_when_built(template: object, match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        NameTemplate(template)  # type: ignore[arg-type]


def test_missing_and_unknown_placeholders_are_named() -> None:
    names = NameTemplate("e{epoch}_{step}")
    with pytest.raises(PolicyError, match="missing placeholder.*epoch") as info:
        names.format(3, {})
    assert info.value.step == 3
    with pytest.raises(PolicyError, match="unknown placeholder.*phase"):
        names.format(3, {"epoch": 1, "phase": "a"})


@pytest.mark.parametrize("value", ["a/b", "x.keepax-y", "a\\b"])
def test_placeholder_values_must_make_a_valid_name(value: str) -> None:
    names = NameTemplate("{tag}_{step}")
    with pytest.raises(PolicyError, match="step directory name"):
        names.format(1, {"tag": value})

