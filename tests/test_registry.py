"""Registry: decorator + dict + listing, close-match errors, import paths and plugin entry points."""

from __future__ import annotations

import inspect
import textwrap
from importlib.metadata import EntryPoint

import pytest

from ptft import registry as registry_module
from ptft.errors import UserError
from ptft.registry import Registry


def test_register_describe_and_meta():
    reg = Registry("widget")

    @reg.register(kind="small")
    def tiny(*, size: int = 1):
        """A tiny widget.

        More text that the listing leaves out."""

    reg.add("big", lambda: None, "A big one")
    assert reg.names() == ["big", "tiny"]
    assert reg.describe() == {"big": "A big one", "tiny": "A tiny widget."}
    assert reg.meta("tiny") == {"kind": "small"} and reg.meta("big") == {}
    assert reg.get("tiny") is tiny and "tiny" in reg


def test_duplicate_name_is_an_error():
    reg = Registry("widget")
    reg.add("a", lambda: None)
    with pytest.raises(ValueError, match="duplicate widget name 'a'"):
        reg.add("a", lambda: None)


def test_unknown_name_lists_close_matches():
    reg = Registry("widget")
    reg.add("conv_autoencoder", lambda: None)
    reg.add("mlp_autoencoder", lambda: None)
    with pytest.raises(UserError, match="did you mean 'mlp_autoencoder'") as info:
        reg.get("mlp_autoencodr")
    assert "Known: conv_autoencoder, mlp_autoencoder" in str(info.value)


def test_import_path_names(tmp_path, monkeypatch):
    (tmp_path / "user_widgets.py").write_text("def build(*, n: int = 2):\n    return n\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("widget", allow_import_path=True)
    assert reg.get("user_widgets:build")() == 2
    with pytest.raises(UserError, match="cannot import module 'no_such_module'"):
        reg.get("no_such_module:build")
    with pytest.raises(UserError, match="has no callable 'missing'"):
        reg.get("user_widgets:missing")
    with pytest.raises(UserError, match="unknown widget"):
        Registry("widget").get("user_widgets:build")  # import paths only where allowed


def test_is_import_path_tells_what_get_would_import_without_importing(tmp_path, monkeypatch):
    (tmp_path / "loud_widgets.py").write_text("raise AssertionError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("widget", allow_import_path=True)
    reg.add("named:with_colon", lambda: None)
    assert reg.is_import_path("loud_widgets:build")
    assert not reg.is_import_path("named:with_colon") and not reg.is_import_path("plain")
    assert not Registry("widget").is_import_path("loud_widgets:build")  # import paths only where allowed


def test_entry_point_plugins_are_listed_and_loaded_lazily(tmp_path, monkeypatch):
    (tmp_path / "plugin_widgets.py").write_text(textwrap.dedent('''
        from __future__ import annotations
        LOADED = True
        def fancy(input_shape, num_classes, *, depth: int = 3):
            return depth
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint(name="fancy", value="plugin_widgets:fancy", group="ptft.widgets")
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [ep] if group == "ptft.widgets" else [])
    reg = Registry("widget", entry_point_group="ptft.widgets")
    assert "fancy" in reg.names() and "plugin_widgets:fancy" in reg.describe()["fancy"]
    builder = reg.get("fancy")
    # String annotations (from __future__) resolve, so config validation sees real types.
    assert inspect.signature(builder).parameters["depth"].annotation is int
    assert builder((1, 8, 8), 10, depth=5) == 5


def widget_family(reg: Registry, members=lambda: ("small", "large"), calls: list | None = None) -> None:
    """A `kit:<part>` family whose resolver records each call."""

    @reg.register_family("kit", members=members, member="part", kind="small")
    def kit(part: str):
        """Any kit part."""
        if calls is not None:
            calls.append(part)
        return lambda *, size=1: f"{part}:{size}"


def test_family_members_resolve_once_through_the_family_resolver():
    reg, calls = Registry("widget", allow_import_path=True), []
    widget_family(reg, calls=calls)
    assert reg.get("kit:small")(size=2) == "small:2"
    assert reg.get("kit:small") is reg.get("kit:small") and calls == ["small"]
    assert "kit:large" in reg and "kit:tiny" not in reg and calls == ["small", "large"]
    assert reg.meta("kit:large") == {"kind": "small"} and reg.families() == ["kit"]
    assert not reg.is_import_path("kit:small") and not reg.is_import_path("kit:tiny")  # never imported


def test_a_family_is_listed_as_one_line_and_not_among_the_names():
    reg = Registry("widget")
    reg.add("plain", lambda: None, "A plain widget")
    widget_family(reg)
    assert reg.names() == ["plain"]
    assert reg.describe() == {"kit:<part>": "Any kit part.", "plain": "A plain widget"}
    assert reg.meta("kit:<part>") == {"kind": "small"}  # what `ptft models` shows in the kind column
    with pytest.raises(UserError, match=r"families: kit:<part>"):
        reg.get("plian")


def test_unknown_family_member_lists_close_members():
    reg = Registry("widget", allow_import_path=True)
    widget_family(reg)
    with pytest.raises(UserError, match=r"unknown widget 'kit:smal': kit has no part 'smal'; did you mean 'kit:small'"
                                        r"\? Known: large, small"):
        reg.get("kit:smal")


def test_a_family_whose_members_cannot_be_listed_raises_its_user_error():
    def not_installed():
        raise UserError("kit parts need the kit package; install it with pip install 'ptft[kit]'")

    reg = Registry("widget")
    widget_family(reg, members=not_installed)
    with pytest.raises(UserError, match=r"pip install 'ptft\[kit\]'"):
        reg.get("kit:small")
    assert "kit:small" not in reg


def test_duplicate_family_is_an_error():
    reg = Registry("widget")
    widget_family(reg)
    with pytest.raises(ValueError, match="duplicate widget family 'kit'"):
        widget_family(reg)
