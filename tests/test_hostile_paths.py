"""Folders we write into hold other people's files, and commands are typed carelessly: a save changes
the modes of the files it wrote and no other; an output never replaces what the command reads, nor
a folder that is not ours; what a killed run left is found and cleaned by the next one."""

import json
import os
import stat
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM

import hf_astroquant  # noqa: F401
from hf_astroquant import AstroQuantConfig, cli, pipeline
from hf_astroquant.gguf.export import export_gguf
from hf_astroquant.file_modes import current_umask
from hf_astroquant.output_dir import MANIFEST
from tiny import CrashAfter, save_tiny_with_tokenizer

RTN = ["--method", "rtn", "--bits", "4", "--group-size", "32"]


@pytest.fixture(scope="module")
def fp(tmp_path_factory):
    return save_tiny_with_tokenizer(tmp_path_factory.mktemp("hostile") / "fp", layers=1, hidden=64, inter=128)


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _tree(path):
    """{relative path: bytes} of every file under `path`: to show nothing in it changed."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ file modes

def test_save_gives_its_own_files_the_umask_mode_and_leaves_private_files_alone(fp, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(fp, quantization_config=AstroQuantConfig(method="rtn", group_size=32))
    target = tmp_path / "project"
    (target / ".ssh").mkdir(parents=True)
    secrets = [target / ".env", target / ".ssh" / "id_ed25519", target / "notes.txt"]
    for path in secrets:
        path.write_text("private")
        path.chmod(0o600)
    model.save_pretrained(target)
    assert all(_mode(p) == 0o600 and p.read_text() == "private" for p in secrets)
    expected = 0o666 & ~current_umask()
    assert _mode(target / "model.safetensors") == expected  # transformers wrote it 0600 through a temp file
    assert _mode(target / "config.json") == expected


def test_a_cli_output_gets_the_umask_mode_and_a_manifest_of_its_files(fp, tmp_path, capsys):
    out = tmp_path / "q"
    assert _run(["quantize", fp, "--out", out, *RTN], capsys)[0] == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]) == set(_tree(out)) - {MANIFEST}
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= set(manifest["files"])
    assert _mode(out / "model.safetensors") == 0o666 & ~current_umask()


# ------------------------------------------------------------------ outputs apart from inputs

@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_quantize_never_writes_over_or_around_its_model(fp, tmp_path, capsys, where):
    import shutil

    project = tmp_path / "proj"
    shutil.copytree(fp, project / "src")
    (project / "keep.txt").write_text("mine")
    src = project / "src"
    out = {"same": src, "parent": project, "inside": src / "q"}[where]
    before = _tree(project)
    code, _, err = _run(["quantize", src, "--out", out, "--overwrite", *RTN], capsys)
    word = {"same": "is MODEL itself", "parent": "holds MODEL", "inside": "lies inside MODEL"}[where]
    assert code == 2 and word in err and str(out) in err
    assert _tree(project) == before  # nothing lost, nothing added


def test_quantize_keeps_its_data_and_folders_apart_from_the_output(fp, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "calib.txt").write_text("some calibration text " * 50)
    code, _, err = _run(["quantize", fp, "--out", data, "--overwrite", "--dataset", data / "calib.txt",
                         "--n-samples", "2", "--seqlen", "16", "--group-size", "32"], capsys)
    assert code == 2 and "holds --dataset" in err
    for flag in ("--resume-dir", "--offload-folder"):  # folders the run fills: apart even before they exist
        code, _, err = _run(["quantize", fp, "--out", tmp_path / "q", flag, tmp_path / "q" / "state", *RTN], capsys)
        assert code == 2 and f"holds {flag}" in err
        assert not (tmp_path / "q").exists()


def test_export_never_replaces_the_checkpoint_it_reads(fp, tmp_path, capsys):
    q = tmp_path / "q"
    assert _run(["quantize", fp, "--out", q, *RTN, "--sym"], capsys)[0] == 0
    before = _tree(q)
    for out, word in ((q, "is DIR itself"), (q / "gptq", "lies inside DIR"), (tmp_path, "holds DIR")):
        code, _, err = _run(["export", q, "--format", "gptq", "--out", out, "--overwrite"], capsys)
        assert code == 2 and word in err, err
    code, _, err = _run(["export", q, "--format", "gguf", "--out", q / "model.gguf"], capsys)
    assert code == 2 and "lies inside the checkpoint read" in err
    assert _tree(q) == before


def test_out_dot_is_refused_before_any_work(fp, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("x")
    start = time.perf_counter()
    code, _, err = _run(["quantize", fp, "--out", ".", "--overwrite", *RTN], capsys)
    assert code == 2 and "the directory this command runs in" in err
    assert time.perf_counter() - start < 5 and (tmp_path / "mine.txt").read_text() == "x"
    code, _, err = _run(["quantize", fp, "--out", "..", *RTN], capsys)
    assert code == 2 and "the directory this command runs in, or holds it" in err


# ------------------------------------------------------------------ --overwrite replaces only ours

def test_overwrite_refuses_a_folder_we_did_not_write(fp, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    code, _, err = _run(["quantize", fp, "--out", theirs, "--overwrite", *RTN], capsys)
    assert code == 2 and "was not written by hf-astroquant" in err
    assert (theirs / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_our_folder_once_someone_added_files(fp, tmp_path, capsys):
    out = tmp_path / "q"
    assert _run(["quantize", fp, "--out", out, *RTN], capsys)[0] == 0
    (out / "eval-notes.md").write_text("mine")
    code, _, err = _run(["quantize", fp, "--out", out, "--overwrite", *RTN], capsys)
    assert code == 2 and "holds files that hf-astroquant did not write (eval-notes.md)" in err
    (out / "eval-notes.md").unlink()
    assert _run(["quantize", fp, "--out", out, "--overwrite", *RTN, "--bits", "8"], capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8


def test_an_output_that_is_a_file_or_a_link_is_refused(fp, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = _run(["quantize", fp, "--out", tmp_path / "file", "--overwrite", *RTN], capsys)
    assert code == 2 and "is a file, not a directory" in err
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, _, err = _run(["quantize", fp, "--out", tmp_path / "link", *RTN], capsys)
    assert code == 2 and "is a symbolic link" in err


def test_gguf_overwrite_replaces_only_a_gguf_file_we_wrote(tmp_path):
    from test_gguf_writer import build_family

    fp = tmp_path / "src" / "fp"
    build_family("smollm", fp)
    tmp_path = tmp_path / "gguf"
    tmp_path.mkdir()
    out = tmp_path / "m.gguf"
    out.write_bytes(b"GGUF" + b"\0" * 60)  # someone else's file
    with pytest.raises(ValueError, match="is not a GGUF file that hf-astroquant wrote"):
        export_gguf(fp, out, "F16", overwrite=True)
    assert out.read_bytes() == b"GGUF" + b"\0" * 60
    out.unlink()
    export_gguf(fp, out, "F16")
    first = out.stat().st_size
    export_gguf(fp, out, "F32", overwrite=True)  # ours: replaced
    assert out.stat().st_size > first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial file left


# ------------------------------------------------------------------ what killed runs leave

def test_partial_outputs_of_killed_runs_are_removed_and_named(fp, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    left = [tmp_path / f".q.partial-{pid}-abc123", tmp_path / ".q.partial-k2j4_x9z"]  # this version's, and older
    for path in left:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".other.partial-1-x").mkdir()  # another output's: not ours to touch
    code, _, err = _run(["quantize", fp, "--out", tmp_path / "q", *RTN], capsys)
    assert code == 0
    assert all(not p.exists() and f"removed {p}, left by a killed run" in err for p in left)
    assert (tmp_path / ".other.partial-1-x").is_dir()
    assert not list(tmp_path.glob(".q.*"))


def test_a_run_refuses_to_write_where_a_live_run_writes(fp, tmp_path, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".q.partial-{other.pid}-abc123"
        busy.mkdir()
        code, _, err = _run(["quantize", fp, "--out", tmp_path / "q", *RTN], capsys)
        assert code == 2 and f"another hf-astroquant run (process {other.pid}) is writing" in err
        assert busy.is_dir() and not (tmp_path / "q").exists()
    finally:
        other.kill()
        other.wait()


def test_an_output_moved_aside_by_a_killed_replace_is_restored(fp, tmp_path, capsys):
    out = tmp_path / "q"
    assert _run(["quantize", fp, "--out", out, *RTN], capsys)[0] == 0
    before = _tree(out)
    out.rename(tmp_path / ".q.old-999999999-x")  # killed between moving the old output aside and the new in
    code, _, err = _run(["quantize", fp, "--out", out, *RTN], capsys)
    assert code == 2 and "restored" in err and "--overwrite" in err  # back in place, and not replaced unasked
    assert _tree(out) == before


def test_a_crash_midway_leaves_neither_partial_nor_changed_output(fp, tmp_path, capsys):
    out = tmp_path / "q"
    assert _run(["quantize", fp, "--out", out, *RTN], capsys)[0] == 0
    before = _tree(out)

    with pipeline.listening(CrashAfter(1)), pytest.raises(RuntimeError, match="simulated crash"):
        cli.main([str(a) for a in ["quantize", fp, "--out", out, "--overwrite", *RTN]])
    assert _tree(out) == before and not list(tmp_path.glob(".q.*"))


def test_the_umask_pass_does_not_follow_links(tmp_path):
    from hf_astroquant.file_modes import apply_umask, snapshot, written_since

    private = tmp_path / "outside"
    private.write_text("x")
    private.chmod(0o600)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "link").symlink_to(private)
    before = snapshot(folder)
    (folder / "new").write_text("y")
    (folder / "new").chmod(0o600)
    written = written_since(folder, before)
    assert written == [folder / "new"]
    apply_umask(written + [folder / "link"])
    assert _mode(private) == 0o600 and _mode(folder / "new") == 0o666 & ~current_umask()
    assert os.path.islink(folder / "link")


def test_push_of_an_output_uploads_only_what_we_wrote(fp, tmp_path, capsys, hub, caplog):
    out = tmp_path / "q"
    assert _run(["quantize", fp, "--out", out, *RTN], capsys)[0] == 0
    (out / "my-api-key.txt").write_text("secret")  # dropped there later by someone
    assert _run(["push", out, "me/q"], capsys)[0] == 0
    pushed = {p.name for p in (hub.root / "me--q").iterdir()}
    assert "model.safetensors" in pushed and "my-api-key.txt" not in pushed and MANIFEST not in pushed
    assert "not uploading my-api-key.txt" in caplog.text


def test_eval_write_records_its_new_files_so_overwrite_still_works(fp, tmp_path, capsys):
    out = tmp_path / "q"
    assert _run(["quantize", fp, "--out", out, *RTN], capsys)[0] == 0
    (tmp_path / "eval.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    before = set(json.loads((out / MANIFEST).read_text())["files"])
    assert _run(["eval", out, "--data", tmp_path / "eval.txt", "--seqlen", "32"], capsys)[0] == 0
    after = set(json.loads((out / MANIFEST).read_text())["files"])
    assert before <= after and after == set(_tree(out)) - {MANIFEST}
    assert _run(["quantize", fp, "--out", out, "--overwrite", *RTN], capsys)[0] == 0
