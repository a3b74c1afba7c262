"""The export registry: a format registered in one place is a `--format` of `hf-astroquant export`, with
its flags, its refusals and the CLI's output folder handling; the built-in formats are found there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hf_astroquant import cli
from hf_astroquant.export import registry
from hf_astroquant.export.registry import ExportOption, Exporter, ExportSummary, register_exporter
from hf_astroquant.export.source import ExportError
from hf_astroquant.output_dir import MANIFEST
from hf_astroquant.workflows import export


class ToyExporter(Exporter):
    """Copies config.json and writes one file; refuses --toy-level above 2 before any work."""

    name, display_name = "toy", "Toy"
    engines = "the toy engine"
    options = (ExportOption("--toy-level", type=int, default=None, metavar="N", help="how toy (1 or 2)"),)
    calls: list = []

    def check(self, **options) -> None:
        super().check(**options)
        if options["toy_level"] not in (None, 1, 2):
            raise ValueError(f"toy_level={options['toy_level']!r} is not valid; allowed: 1, 2")

    def export(self, src: Path, out: Path, *, overwrite: bool = False, toy_level: int | None = None) -> ExportSummary:
        self.calls.append((src, out, overwrite, toy_level))
        if (src / "refuse").exists():
            raise ExportError(f"{src} holds a file named refuse")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "config.json", out / "config.json")
        (out / "weights.toy").write_text(f"level {toy_level or 1}\n")
        return ExportSummary(self.name, out, ["config.json", "weights.toy"], [("format", "toy"), ("level", toy_level)])


@pytest.fixture
def toy():
    exporter = register_exporter(ToyExporter())
    exporter.calls.clear()
    yield exporter
    registry.unregister_exporter("toy")


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def _export_parser():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["export"]


def test_the_built_in_formats_are_registered_in_order():
    formats = registry.exporters()
    assert list(formats)[:3] == ["gptq", "compressed-tensors", "gguf"]
    assert formats["gguf"].file_suffix == ".gguf" and formats["gptq"].file_suffix is None
    assert {o.flag for o, _ in registry.export_options()} >= {"--gguf-type", "--checkpoint-format", "--dtype"}


def test_a_registered_format_is_a_cli_format_with_its_flags(toy):
    export = _export_parser()
    fmt = next(a for a in export._actions if a.dest == "format")
    assert "toy" in fmt.choices and "toy (the toy engine)" in fmt.help
    help_text = export.format_help()
    assert "--toy-level N" in help_text and "how toy (1 or 2)" in help_text
    assert "toy" not in cli.build_parser().parse_args(["export", "d", "--format", "gptq", "--out", "o"]).format
    registry.unregister_exporter("toy")
    assert "toy" not in next(a for a in _export_parser()._actions if a.dest == "format").choices


def test_the_cli_runs_a_registered_format(toy, src, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["export", str(src), "--format", "toy", "--toy-level", "2", "--out", str(out)]) == 0
    (called_src, written, overwrite, level), = toy.calls
    assert called_src == src and written != out and overwrite is True and level == 2  # a hidden sibling, then moved
    assert (out / "weights.toy").read_text() == "level 2\n" and (out / "README.md").is_file()  # the card too
    assert set(json.loads((out / MANIFEST).read_text())["files"]) >= {"config.json", "weights.toy", "README.md"}
    stdout = capsys.readouterr().out
    assert "source" in stdout and str(out) in stdout and "level" in stdout
    assert not list(tmp_path.glob(".out.partial-*"))


def test_a_refusal_is_one_line_before_any_work(toy, src, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["export", str(src), "--format", "toy", "--toy-level", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "hf-astroquant export: error: toy_level=3 is not valid; allowed: 1, 2"
    assert "Traceback" not in err and toy.calls == [] and not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_what_the_format_cannot_hold_is_one_line_and_leaves_nothing(toy, src, tmp_path, capsys):
    (src / "refuse").touch()
    assert cli.main(["export", str(src), "--format", "toy", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"hf-astroquant export: error: cannot export to Toy: {src} holds a file named refuse"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_another_formats_flag_is_refused(toy, src, tmp_path, capsys):
    assert cli.main(["export", str(src), "--format", "gptq", "--toy-level", "1", "--out", str(tmp_path / "g")]) == 2
    assert "--toy-level is a Toy option; --format gptq has none" in capsys.readouterr().err
    assert cli.main(["export", str(src), "--format", "toy", "--gguf-type", "F16", "--out", str(tmp_path / "g")]) == 2
    assert "--gguf-type is a GGUF option; --format toy has none" in capsys.readouterr().err
    assert toy.calls == []


def test_the_python_export_fills_defaults_checks_and_writes_what_the_cli_writes(toy, src, tmp_path):
    summary = export(src, tmp_path / "o", "toy")
    assert summary.format == "toy" and summary.files == ["config.json", "weights.toy"] and toy.calls[-1][3] is None
    written = {p.name for p in (tmp_path / "o").iterdir()}
    assert {"config.json", "weights.toy", "README.md", MANIFEST} <= written and not list(tmp_path.glob(".o.*"))
    with pytest.raises(ValueError, match="toy_level=5 is not valid"):
        export(src, tmp_path / "p", "toy", toy_level=5)
    with pytest.raises(ValueError, match="not an option of the Toy export"):
        export(src, tmp_path / "p", "toy", bits=4)
    with pytest.raises(ValueError, match="format='nope' is not valid; allowed: gptq, compressed-tensors, gguf"):
        export(src, tmp_path / "p", "nope")
    with pytest.raises(ValueError, match="exists and is not empty; pass --overwrite"):
        export(src, tmp_path / "o", "toy")
    with pytest.raises(ValueError):  # never into the folder it reads
        export(src, src, "toy", overwrite=True)
    assert not (tmp_path / "p").exists()


def test_registration_refuses_clashes(toy):
    class Other(ToyExporter):
        pass

    with pytest.raises(ValueError, match="--format toy is registered already"):
        register_exporter(Other())
    register_exporter(ToyExporter())  # the same class again (a reloaded module): replaces itself

    class Clash(Exporter):
        name, display_name = "clash", "Clash"
        options = (ExportOption("--dtype", help="another dtype"),)

    with pytest.raises(ValueError, match="--dtype is declared differently"):
        register_exporter(Clash())

    class Reserved(Exporter):
        name, display_name = "reserved", "Reserved"
        options = (ExportOption("--out", help="mine"),)

    with pytest.raises(ValueError, match="option --out is not allowed"):
        register_exporter(Reserved())
    assert "clash" not in registry.exporters() and "reserved" not in registry.exporters()
