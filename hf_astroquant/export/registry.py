"""The export formats: one interface (`Exporter`), one registry, one summary type.

An export format is one module of this package that defines an `Exporter` and registers it:

    class ToyExporter(Exporter):
        name, display_name = "toy", "Toy"                  # `--format toy`; "cannot export to Toy: ..."
        engines = "toy-engine"                             # in --format's help: "toy (toy-engine)"
        options = (ExportOption("--toy-level", "...", type=int),)   # a flag of `export`

        def check(self, **options): ...                    # refusals, before any work
        def export(self, src, out, *, overwrite=False, **options) -> ExportSummary: ...

    register_exporter(ToyExporter())

`exporters()` imports every module of the package once, so the new module is found without being
listed anywhere; the CLI's `export --format` choices and its per-format flags come from here, and
`hf_astroquant.workflows.export` runs any format (the CLI's `export` over it). A format that writes
one file (GGUF) sets `file_suffix` and writes its file safely itself; a folder format writes into the
fresh folder the workflow gives it, and the workflow adds the report and card and puts the folder in
place (output_dir.py).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class ExportOption:
    """One option of an export format: its CLI flag (`--checkpoint-format`), the keyword its exporter
    takes (`checkpoint_format`), and argparse's choices/type/help. An option whose default is None
    and that is given with another format is refused; one with a default cannot be told apart from
    not given, so it is only ignored there."""

    flag: str
    help: str
    choices: tuple | None = None
    default: Any = None
    metavar: str | None = None
    type: Callable[[str], Any] | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def argparse_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dest": self.dest, "default": self.default, "help": self.help}
        for key in ("choices", "metavar", "type"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        return kwargs


@dataclass
class ExportSummary:
    """What an export wrote, the same for every format."""

    format: str  # the exporter's name (the --format value)
    out: Path  # the folder it wrote into, or its one file
    files: list[str]  # the files written: relative to `out` for a folder, [out.name] for one file
    rows: list[tuple[str, Any]]  # the CLI's table after "source" and "output" (size included)
    notes: list[str] = field(default_factory=list)  # what an engine will refuse, how to run the file
    details: Any = None  # the format's own summary (export_gptq's, export_compressed_tensors', export_gguf's)


class Exporter:
    """One export format. Subclasses set the class attributes and `export`, and may add refusals to
    `check`; an instance is registered with `register_exporter`."""

    name: str = ""  # the --format value
    display_name: str = ""  # in messages: "cannot export to GPTQ: ..."
    engines: str = ""  # who reads it, shown in --format's help after the name
    options: tuple[ExportOption, ...] = ()
    file_suffix: str | None = None  # the export is one file with this suffix (".gguf"); None: a folder
    order: int = 100  # where it is listed among the formats (then by name)

    def check(self, **options) -> None:
        """Refusals, run before any work: a one-line ValueError naming the value and what is allowed.
        This one refuses an option the format does not have and a value outside an option's choices."""
        known = {o.dest: o for o in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not an option of the {self.display_name} export; allowed: "
                             f"{', '.join(known) or 'none'}")
        for key, value in options.items():
            choices = known[key].choices
            if value is not None and choices is not None and value not in choices:
                raise ValueError(f"{key}={value!r} is not valid; allowed: {', '.join(map(str, choices))}")

    def export(self, src: Path, out: Path, *, overwrite: bool = False, **options) -> ExportSummary:
        """Write the copy of the checkpoint directory `src` at `out` (a folder, or the one file)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} --format {self.name}>"


# --------------------------------------------------------------------------- the registry

_REGISTRY: dict[str, Exporter] = {}
_RESERVED = {"dir", "format", "out", "overwrite", "command", "func", "verbose"}  # the CLI's own arguments
_discovered = False


def register_exporter(exporter: Exporter) -> Exporter:
    """Add `exporter` (an Exporter instance) under its name; returns it. The same class registered again
    (a reloaded module) replaces itself; another exporter under a taken name, a flag the CLI uses itself
    or one another format declares differently is refused (ValueError)."""
    if not isinstance(exporter, Exporter):
        raise TypeError(f"{exporter!r} is not an Exporter instance")
    if not exporter.name or not exporter.display_name:
        raise ValueError(f"{exporter!r}: an exporter needs a name (its --format value) and a display_name")
    old = _REGISTRY.get(exporter.name)
    if old is not None and (type(old).__module__, type(old).__qualname__) != (type(exporter).__module__,
                                                                             type(exporter).__qualname__):
        raise ValueError(f"--format {exporter.name} is registered already ({old!r})")
    for option in exporter.options:
        if option.dest in _RESERVED or not option.flag.startswith("--"):
            raise ValueError(f"{exporter!r}: option {option.flag} is not allowed: a flag --NAME other than "
                             f"--{', --'.join(sorted(_RESERVED))}")
        for other in _REGISTRY.values():
            clash = next((o for o in other.options if o.dest == option.dest and o != option), None)
            if other.name != exporter.name and clash is not None:
                raise ValueError(f"{exporter!r}: option {option.flag} is declared differently by {other!r}")
    _REGISTRY[exporter.name] = exporter
    return exporter


def unregister_exporter(name: str) -> None:
    """Remove the exporter registered as `name` (for tests and plugins); nothing when there is none."""
    _REGISTRY.pop(name, None)


def _discover() -> None:
    """Import every module of this package once: each export format registers itself."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = __name__.rpartition(".")[0]
    try:
        for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{package}.{module.name}")
    except BaseException:
        _discovered = False  # a module that cannot be imported fails every listing, not only the first
        raise


def exporters() -> dict[str, Exporter]:
    """Every registered export format, {name: exporter}, in listing order."""
    _discover()
    return dict(sorted(_REGISTRY.items(), key=lambda item: (item[1].order, item[0])))


def get_exporter(name: str) -> Exporter:
    known = exporters()
    if name not in known:
        raise ValueError(f"format={name!r} is not valid; allowed: {', '.join(known)}")
    return known[name]


def export_options() -> list[tuple[ExportOption, list[Exporter]]]:
    """Every format's options, each once, in listing order, with the exporters that take it."""
    found: dict[str, tuple[ExportOption, list[Exporter]]] = {}
    for exporter in exporters().values():
        for option in exporter.options:
            found.setdefault(option.dest, (option, []))[1].append(exporter)
    return list(found.values())


__all__ = ["ExportOption", "ExportSummary", "Exporter", "export_options", "exporters", "get_exporter",
           "register_exporter", "unregister_exporter"]
