"""Named builders: models, datasets, objectives, optimizers, schedules.

A `Registry` is a dict of builder functions filled by a decorator. Registries are filled by
explicit imports in their package's `__init__`, and builder bodies import torch lazily, so
listing or validating names (`ptft models`, `ptft config`) never imports torch.

A registry may also hold *families*: every `prefix:member` name (`torchvision:convnext_tiny`)
is resolved by one function from the member to its builder, after checking the member against
the family's list. Only that list may import a library (timm's does; torchvision's is written down).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import NamedTuple

from ptft.errors import UserError

Builder = Callable[..., object]
# A list of members longer than this is not printed in full in an "unknown name" message.
LISTED_MEMBERS = 100


class Family(NamedTuple):
    """`prefix:member` names: `resolve(member)` is the member's builder, `members()` the valid members."""

    resolve: Callable[[str], Builder]
    members: Callable[[], Iterable[str]]
    description: str
    member: str  # what a member is called in listings and messages: "architecture"
    meta: dict


class Registry:
    """A name -> builder mapping with descriptions and helpful errors.

    Args:
        kind: what the entries are ("model", "dataset", ...), used in messages.
        entry_point_group: optional packaging entry-point group whose entries are
            merged in, so users can add builders without editing ptft.
        allow_import_path: accept `package.module:builder` names that are not registered.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None, allow_import_path: bool = False):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.allow_import_path = allow_import_path
        self._builders: dict[str, Builder] = {}
        self._descriptions: dict[str, str] = {}
        self._meta: dict[str, dict] = {}
        self._families: dict[str, Family] = {}
        self._resolved: dict[str, Builder] = {}  # family name -> builder, so each is resolved once
        self._entry_points_loaded = False

    def register(self, name: str | None = None, description: str | None = None, **meta) -> Callable[[Builder], Builder]:
        """Decorator: register a builder under `name` (default: the function's name).

        `meta` holds facts about the entry that are needed without building it, such as a
        model's `kind` ("autoencoder", "classifier", "encoder").
        """

        def decorate(builder: Builder) -> Builder:
            self.add(name or builder.__name__, builder, description, **meta)
            return builder

        return decorate

    def add(self, name: str, builder: Builder, description: str | None = None, **meta) -> None:
        if name in self._builders:
            raise ValueError(f"duplicate {self.kind} name {name!r}")
        self._builders[name] = builder
        doc = inspect.getdoc(builder) or ""
        self._descriptions[name] = description or (doc.splitlines()[0] if doc else "")
        self._meta[name] = dict(meta)

    def register_family(self, prefix: str, members: Callable[[], Iterable[str]], description: str | None = None,
                        member: str = "name", **meta) -> Callable[[Callable[[str], Builder]], Callable[[str], Builder]]:
        """Decorator: `prefix:<member>` names resolve through the decorated `resolve(member) -> builder`.

        `members()` lists the valid members; it is called only for names with this prefix, so it
        may import the library. `meta` holds for every member (e.g. `kind`).
        """

        def decorate(resolve: Callable[[str], Builder]) -> Callable[[str], Builder]:
            if prefix in self._families:
                raise ValueError(f"duplicate {self.kind} family {prefix!r}")
            doc = inspect.getdoc(resolve) or ""
            self._families[prefix] = Family(resolve, members, description or (doc.splitlines()[0] if doc else ""),
                                            member, dict(meta))
            return resolve

        return decorate

    def meta(self, name: str) -> dict:
        """The facts registered with `name` or its family (empty for import paths and plugins)."""
        self._load_entry_points()
        family = self._family_of(name)
        if name not in self._meta and family is not None:
            return dict(family.meta)
        return dict(self._meta.get(name, {}))

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        if name in self._builders:
            return True
        if self._family_of(name) is None:
            return False
        try:
            self._family_builder(name)
        except UserError:  # not a member, or the library is not installed
            return False
        return True

    def names(self) -> list[str]:
        """The registered names; family members are not listed (see `families`)."""
        self._load_entry_points()
        return sorted(self._builders)

    def families(self) -> list[str]:
        """The family prefixes, e.g. ["timm", "torchvision"]."""
        return sorted(self._families)

    def describe(self) -> dict[str, str]:
        """Name -> one-line description, sorted by name; a family is one `prefix:<member>` line."""
        self._load_entry_points()
        described = {name: self._descriptions[name] for name in self._builders}
        described.update({f"{prefix}:<{f.member}>": f.description for prefix, f in self._families.items()})
        return dict(sorted(described.items()))

    def get(self, name: str) -> Builder:
        """The builder registered as `name`; unknown names raise UserError listing close matches."""
        self._load_entry_points()
        if name in self._builders:
            return self._builders[name]
        if self._family_of(name) is not None:
            return self._family_builder(name)
        if self.is_import_path(name):
            return self._import_builder(name)
        raise UserError(self.unknown_message(name))

    def is_import_path(self, name: str) -> bool:
        """Whether `get(name)` would import a `package.module:builder` rather than return a registered builder."""
        return (self.allow_import_path and ":" in name and name not in self._builders
                and self._family_of(name) is None)

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        msg = f"unknown {self.kind} {name!r}{hint} Known: {', '.join(self.names())}"
        if self._families:
            msg += f"; families: {', '.join(f'{p}:<{f.member}>' for p, f in sorted(self._families.items()))}"
        if self.allow_import_path:
            msg += " (or give 'package.module:builder')"
        return msg

    def _family_of(self, name: str) -> Family | None:
        prefix, colon, _ = str(name).partition(":")
        return self._families.get(prefix) if colon else None

    def _family_builder(self, name: str) -> Builder:
        if name not in self._resolved:
            prefix, _, member = name.partition(":")
            family = self._families[prefix]
            members = list(family.members())  # may raise UserError: the library is not installed
            if member not in members:
                raise UserError(self._unknown_member_message(prefix, family, member, members))
            self._resolved[name] = family.resolve(member)
        return self._resolved[name]

    def _unknown_member_message(self, prefix: str, family: Family, member: str, members: list[str]) -> str:
        close = difflib.get_close_matches(member, members, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(f'{prefix}:{c}') for c in close)}?" if close else ""
        known = (f" Known: {', '.join(sorted(members))}" if len(members) <= LISTED_MEMBERS
                 else f" ({len(members)} known)")
        return f"unknown {self.kind} {prefix + ':' + member!r}: {prefix} has no {family.member} {member!r}{hint}{known}"

    def _import_builder(self, path: str) -> Builder:
        module_name, _, attr = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UserError(f"{self.kind} {path!r}: cannot import module {module_name!r} ({exc})") from None
        builder = getattr(module, attr, None)
        if not callable(builder):
            raise UserError(f"{self.kind} {path!r}: module {module_name!r} has no callable {attr!r}")
        return builder

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded or not self.entry_point_group:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            if ep.name not in self._builders:
                # Loaded lazily: importing a user's plugin may import torch.
                self.add(ep.name, _LazyEntryPoint(ep), f"(plugin {ep.value})")


class _LazyEntryPoint:
    """Defers importing a plugin's module until its builder is called."""

    def __init__(self, ep):
        self._ep = ep
        self._builder: Builder | None = None

    def load(self) -> Builder:
        if self._builder is None:
            self._builder = self._ep.load()
        return self._builder

    def __call__(self, *args, **kwargs):
        return self.load()(*args, **kwargs)

    @property
    def __signature__(self):
        return inspect.signature(self.load(), eval_str=True)
