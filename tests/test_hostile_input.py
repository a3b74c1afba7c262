"""Bad data and careless flags end in one line naming the value and what is allowed, before anything
long runs: no traceback, no hours of work lost at the end."""

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import hf_astroquant  # noqa: F401
from hf_astroquant import AstroQuantConfig, cli
from hf_astroquant.model_limits import position_limit, vocab_limit
from tiny import save_tiny, save_tiny_with_tokenizer, tiny_llama, tiny_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. " * 40
CALIB = ["--n-samples", "2", "--seqlen", "16", "--group-size", "32"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("input")
    save_tiny_with_tokenizer(root / "fp", layers=1, hidden=64, inter=128)
    save_tiny(root / "notok", layers=1, hidden=64, inter=128)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=32,
                               bos_token_id=1, eos_token_id=1)).save_pretrained(root / "gpt2")
    tiny_tokenizer().save_pretrained(root / "gpt2")
    (root / "calib.txt").write_text(TEXT)
    (root / "binary.dat").write_bytes(bytes(range(256)) * 8)
    return root


def _run(argv, capsys):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv,says", [
    (["--modules-to-not-convert", "mlp.("], "'mlp.(' is not one (missing ), unterminated subpattern"),
    (["--eval-data", "{root}/calib.txt", "--eval-seqlen", "0"], "--eval-seqlen: 0 is not allowed: a positive integer"),
    (["--eval-data", "{root}/calib.txt", "--eval-windows", "0"], "--eval-windows: 0 is not allowed"),
    (["--statistics-dtype", "float16"], "argument --statistics-dtype: invalid choice: 'float16'"),
    (["--dataset", "{root}/binary.dat"], "dataset file {root}/binary.dat is not UTF-8 text (byte 0x80 at offset 128)"),
    (["--eval-data", "{root}/binary.dat"], "evaluation file {root}/binary.dat is not UTF-8 text"),
    (["--tokenizer", "{root}/notok"], "cannot load the tokenizer of '{root}/notok' (the directory has none of"),
    (["--offload-folder", "{root}/calib.txt"], "--offload-folder {root}/calib.txt exists and is not a directory"),
    (["--beam-width", "1000000", "--rounding", "beam"], "beam_width=1000000 is not valid; allowed: an integer in [1, 64]"),
    (["--n-samples", "8192", "--seqlen", "4096"], "n_samples=8192 is not valid; allowed: at most 4096 with seqlen=4096"),
])
def test_quantize_refuses_bad_flags_and_data_in_one_line(root, tmp_path, capsys, argv, says):
    argv = [a.format(root=root) for a in argv]
    start = time.perf_counter()
    code, _, err = _run(["quantize", root / "fp", "--out", tmp_path / "q", "--dataset", root / "calib.txt",
                         *CALIB, *argv], capsys)
    assert code == 2 and says.format(root=root) in _one_line_error(err)
    assert time.perf_counter() - start < 10 and not (tmp_path / "q").exists()


def test_a_window_longer_than_learned_positions_is_refused_by_name(root, tmp_path, capsys):
    code, _, err = _run(["quantize", root / "gpt2", "--out", tmp_path / "q", "--dataset", root / "calib.txt",
                         "--n-samples", "2", "--seqlen", "64", "--group-size", "32"], capsys)
    assert code == 2 and ("seqlen=64 is longer than GPT2LMHeadModel can read: its learned position table holds 32 "
                          "positions") in _one_line_error(err)
    code, _, err = _run(["eval", root / "gpt2", "--data", root / "calib.txt", "--seqlen", "64"], capsys)
    assert code == 2 and "seqlen=64 is longer than" in _one_line_error(err)
    code, _, err = _run(["eval", root / "gpt2", "--data", root / "calib.txt", "--seqlen", "32", "--no-write"], capsys)
    assert code == 0, err  # the table's own length is fine


@pytest.mark.parametrize("argv,says", [
    (["--seqlen", "0"], "--seqlen: 0 is not allowed"),
    (["--max-windows", "-3"], "--max-windows: -3 is not allowed"),
    (["--data", "{root}/binary.dat"], "is not UTF-8 text"),
])
def test_eval_refuses_bad_flags_in_one_line(root, capsys, argv, says):
    argv = [a.format(root=root) for a in argv]
    code, _, err = _run(["eval", root / "fp", *argv], capsys)
    assert code == 2 and says in _one_line_error(err)


def test_round_to_nearest_needs_no_tokenizer(root, tmp_path, capsys):
    code, _, err = _run(["quantize", root / "notok", "--out", tmp_path / "q", "--method", "rtn", "--group-size", "32"],
                        capsys)
    assert code == 0 and "no tokenizer saved with the model" in err
    assert (tmp_path / "q" / "model.safetensors").is_file() and not (tmp_path / "q" / "tokenizer.json").exists()
    code, _, err = _run(["quantize", root / "notok", "--out", tmp_path / "q2", "--dataset", root / "calib.txt", *CALIB],
                        capsys)
    assert code == 2 and "cannot load the tokenizer of" in _one_line_error(err)


@pytest.mark.parametrize("data,says", [
    (torch.empty(0, 16, dtype=torch.long), "got shape (0, 16)"),
    (torch.empty(4, 0, dtype=torch.long), "got shape (4, 0)"),
    (torch.full((2, 16), 128), "calibration window 0 holds token id 128 at [0]; the model's vocabulary has ids 0 to 127"),
    (torch.full((2, 16), -1), "calibration window 0 holds token id -1 at [0]"),
    ([[1, 2, 3], [4, 5, 500]], "calibration window 1 holds token id 500 at [2]"),
])
def test_token_windows_the_model_cannot_read_are_refused_before_loading(root, data, says):
    with pytest.raises(ValueError) as err:
        AutoModelForCausalLM.from_pretrained(root / "fp", quantization_config=AstroQuantConfig(dataset=data,
                                                                                              group_size=32))
    assert says in str(err.value)


def test_model_limits_read_the_tables_of_each_family():
    assert vocab_limit(tiny_llama(layers=1)) == 128 and position_limit(tiny_llama(layers=1)) is None  # rotary
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=48))
    assert (vocab_limit(gpt2), position_limit(gpt2)) == (100, 48)
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                                   vocab_size=100, max_position_embeddings=40, word_embed_proj_dim=32))
    assert position_limit(opt) == 40  # its table keeps 2 extra rows
    with torch.no_grad():
        opt(torch.zeros(1, 40, dtype=torch.long))  # and 40 positions do run
