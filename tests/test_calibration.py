import pytest
import torch

from hf_astroquant.calibration import CalibrationDataError, batch_windows, prepare_calibration, sample_windows
from tiny import CharTokenizer


TOK = CharTokenizer()
TEXT = "The quick brown fox jumps over the lazy dog. " * 20


def test_list_of_strings_is_joined_and_windows_are_drawn_reproducibly():
    w1, rec = prepare_calibration([TEXT, TEXT], TOK, n_samples=5, seqlen=32, seed=1)
    w2, _ = prepare_calibration([TEXT, TEXT], TOK, n_samples=5, seqlen=32, seed=1)
    w3, _ = prepare_calibration([TEXT, TEXT], TOK, n_samples=5, seqlen=32, seed=2)
    assert len(w1) == 5 and all(len(w) == 32 for w in w1)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert not all(torch.equal(a, b) for a, b in zip(w1, w3))
    assert rec == {"source": "2 texts", "n_samples": 5, "seqlen": 32, "seed": 1}


def test_token_windows_are_used_exactly_as_given():
    windows = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    out, rec = prepare_calibration(windows, None, n_samples=99, seqlen=999, seed=0)
    assert [w.tolist() for w in out] == windows
    t = torch.arange(12).reshape(3, 4)
    out, rec = prepare_calibration(t, None, n_samples=99, seqlen=999, seed=0)
    assert torch.equal(torch.stack(out), t) and rec["n_samples"] == 3 and rec["seqlen"] == 4


def test_local_text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    out, rec = prepare_calibration(str(path), TOK, n_samples=3, seqlen=16, seed=0)
    assert len(out) == 3 and rec["source"] == "text file calib.txt"
    out2, _ = prepare_calibration(path, TOK, n_samples=3, seqlen=16, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(out, out2))


def test_datasets_dataset_text_column():
    import datasets

    ds = datasets.Dataset.from_dict({"id": [1, 2], "content": [TEXT, TEXT]})
    out, rec = prepare_calibration(ds, TOK, n_samples=2, seqlen=16, seed=0)
    assert len(out) == 2 and "content" in rec["source"]
    with pytest.raises(CalibrationDataError, match="no text column"):
        prepare_calibration(datasets.Dataset.from_dict({"id": [1, 2]}), TOK, 2, 16, 0)


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_named_datasets_fail_at_once_offline(monkeypatch, name):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the Hub must not be tried"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationDataError, match=f"'{name}' is on the Hugging Face Hub, but HF_HUB_OFFLINE is set"):
        prepare_calibration(name, TOK, 2, 16, 0)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    import socket

    def unreachable(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(CalibrationDataError, match="cannot be reached .*Offline, pass a list of strings"):
        prepare_calibration(name, TOK, 2, 16, 0)


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_named_datasets_give_a_clear_error_when_the_download_fails(monkeypatch, name):
    import datasets

    from hf_astroquant import hub_access

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(hub_access, "unreachable_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CalibrationDataError, match=f"could not load calibration dataset '{name}'.*Offline"):
        prepare_calibration(name, TOK, 2, 16, 0)


def test_named_dataset_is_loaded_through_datasets(monkeypatch):
    import datasets

    from hf_astroquant import hub_access

    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        return datasets.Dataset.from_dict({"text": [TEXT, ""]})

    monkeypatch.setattr(hub_access, "unreachable_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    out, rec = prepare_calibration("wikitext2", TOK, 2, 16, 0)
    assert calls[0][:2] == ("wikitext", "wikitext-2-raw-v1") and rec["source"] == "wikitext2" and len(out) == 2


@pytest.mark.parametrize("data,tokenizer,match", [
    (None, TOK, "no calibration data"),
    ([], TOK, "empty list"),
    (["", "  "], TOK, "no text"),
    (["short"], TOK, "fewer than seqlen"),
    ([TEXT], None, "needs tokenizer"),
    (["text", 3], TOK, "item 1 is int"),
    ([[1, 2], []], None, r"dataset\[1\]"),
    ([[1.5, 2.0]], None, r"dataset\[0\]"),
    (torch.zeros(2, 3), None, "integer token ids"),
    (torch.zeros(5, dtype=torch.long), None, "2-D"),
    ("no-such-file-or-name", TOK, "neither an existing text file"),
    (3.5, TOK, "unsupported"),
])
def test_bad_calibration_data_is_named(data, tokenizer, match):
    with pytest.raises(CalibrationDataError, match=match):
        prepare_calibration(data, tokenizer, n_samples=2, seqlen=64, seed=0)


def test_sample_windows_bounds():
    ids = torch.arange(100)
    ws = sample_windows(ids, 50, 100, seed=0)
    assert all(torch.equal(w, ids) for w in ws)
    with pytest.raises(CalibrationDataError, match="100 tokens, fewer than seqlen=101"):
        sample_windows(ids, 1, 101, seed=0)


def test_batches_group_equal_lengths():
    ws = [torch.zeros(4, dtype=torch.long)] * 5 + [torch.zeros(2, dtype=torch.long)]
    batches = batch_windows(ws, 2)
    assert sorted(tuple(b.shape) for b in batches) == [(1, 2), (1, 4), (2, 4), (2, 4)]
