"""Data-parallel calibration under torch.distributed (gloo, CPU): the CLI under `torchrun
--nproc-per-node 2` gives the single-process result, reruns identically, and a killed rank fails the
job with a resumable state."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_astroquant.distributed import Ranks

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"
TIMEOUT = 600  # a hung collective must fail the test, not CI


def _env() -> dict:
    # one thread per rank (two ranks share this machine's cores), and the package importable from
    # the worker script wherever it runs
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]),
            "TOKENIZERS_PARALLELISM": "false"}


def _torchrun(args: list, nproc: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env={**_env(), **(env or {})})


def _cli(args: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_astroquant", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=_env())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama (3 blocks) and a tiny Qwen3-MoE (8 experts), each with a tokenizer, and calibration text."""
    from moe_families import tiny_moe_model
    from tiny import save_tiny_with_tokenizer, tiny_tokenizer

    root = tmp_path_factory.mktemp("distributed")
    save_tiny_with_tokenizer(root / "llama", layers=3)
    tiny_moe_model("qwen3_moe", experts=8).save_pretrained(root / "moe")
    tiny_tokenizer().save_pretrained(root / "moe")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo plaid cards".split()
    (root / "calib.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)))
    return root


def _quantize_args(root: Path, model: str, out: Path, *extra) -> list:
    return ["quantize", root / model, "--out", out, "--bits", "4", "--group-size", "32", "--dataset", root / "calib.txt",
            "--n-samples", "8", "--seqlen", "32", *extra]


def _run_two(root, model, out, *extra, env=None):
    run = _torchrun(["-m", "hf_astroquant", *_quantize_args(root, model, out, *extra)], env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _run_one(root, model, out, *extra):
    run = _cli(_quantize_args(root, model, out, *extra))
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _codes_and_logits(directory: Path):
    import hf_astroquant  # noqa: F401  (registers the quantizer)
    from transformers import AutoModelForCausalLM

    from hf_astroquant.modules import QuantLinear

    model = AutoModelForCausalLM.from_pretrained(directory)
    codes = {n: m.unpack()[0] for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return codes, model(ids).logits


def _agreement(a: Path, b: Path) -> tuple[float, float]:
    """(the share of codes that are the same, the logits' relative difference)."""
    (ca, la), (cb, lb) = _codes_and_logits(a), _codes_and_logits(b)
    assert ca.keys() == cb.keys() and ca
    same = sum(int((ca[n] == cb[n]).sum()) for n in ca) / sum(ca[n].numel() for n in ca)
    return same, float((la - lb).norm() / la.norm())


def _tensors_equal(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# --------------------------------------------------------------------------- Ranks, on a real group

@pytest.mark.parametrize("n", [2, 3])
def test_ranks_sum_broadcast_and_agreement_on_a_gloo_group(tmp_path, n):
    run = _torchrun([WORKER, "ranks", tmp_path], nproc=n)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]
    ones = sum(range(1, n + 1))
    for s in seen:
        assert s["world_size"] == n
        assert s["sum_exact"]  # rank 0's piece + rank 1's + ..., in that order, bit for bit
        assert s["stats"] == {"h": ones, "n": 10 * ones, "d": 1.0, "n_fp": 5}  # only rank 0 had a D: zeros added
        assert s["numbers"] == [ones, 0.5 * n]
        assert s["broadcast"] == {"from": 1, "t": [0, 2, 4, 6]}
        assert s["broadcast_bytes"] > 0
        assert s["reduced_bytes"] == 4 * 3 * ((1 << 22) // 3 + 5)  # (counted after the first sum)
        assert f"ranks {list(range(1, n))} hold another a string than rank 0" in s["disagree"]
    assert len({s["sum_digest"] for s in seen}) == 1


def test_a_share_of_the_windows_per_rank():
    assert Ranks(0, 3).share(8) == [0, 3, 6] and Ranks(2, 3).share(8) == [2, 5]
    assert Ranks(1, 3).local_count(4) == 1 and Ranks(0, 3).local_count(4) == 2  # of windows 0..3
    assert Ranks().share(5) == [0, 1, 2, 3, 4] and not Ranks().active
    with pytest.raises(ValueError, match="1 calibration window.*cannot be shared by 2 ranks.*at least 2"):
        Ranks(0, 2).share(1)
    with pytest.raises(ValueError, match="rank 2 of world_size 2"):
        Ranks(2, 2)


# --------------------------------------------------------------------------- the CLI under torchrun

@pytest.mark.parametrize("model", ["llama", "moe"])
@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_two_ranks_give_the_single_process_result(models, tmp_path, model, method):
    # float64 statistics (the default under torch.distributed) make the split of the windows irrelevant
    extra = ["--method", method, "--min-expert-tokens", "40"]  # (some experts fall back on the summed count)
    _run_one(models, model, tmp_path / "one", *extra, "--statistics-dtype", "float64")
    run = _run_two(models, model, tmp_path / "two", *extra)
    same, logits = _agreement(tmp_path / "one", tmp_path / "two")
    assert same >= 0.999 and logits <= 1e-4, (same, logits)
    assert run.stdout.count("hf-astroquant quantize: summary") == 1  # rank 0 reports, and writes
    assert "ranks (torch.distributed)" in run.stdout
    one = json.loads((tmp_path / "one" / "astroquant_report.json").read_text())
    two = json.loads((tmp_path / "two" / "astroquant_report.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["distributed"]["reduced_bytes"] > 0 and two["distributed"]["broadcast_bytes"] > 0
    assert two.get("expert_tokens") == one.get("expert_tokens")  # routed tokens, counted over both ranks
    assert two.get("expert_fallback") == one.get("expert_fallback")
    if model == "moe":
        assert one["expert_fallback"]  # the fallback path ran, on counts summed over ranks
    if (model, method) == ("moe", "gptaq"):  # and a second two-rank run is the first one
        _run_two(models, model, tmp_path / "again", *extra)
        assert _tensors_equal(tmp_path / "two", tmp_path / "again")
    assert "2 ranks (torch.distributed)" in (tmp_path / "two" / "README.md").read_text()


def test_two_ranks_rerun_identically_through_every_pass(models, tmp_path):
    # the staged path (two batches per rank), the scale search, Astro, the online rotation and the
    # refinement (its pieces split over ranks, gradients summed), twice
    extra = ["--method", "gptaq", "--bits", "3", "--transform", "scale", "--astro", "--online-rotation", "down",
             "--refine-steps", "4", "--refine-batch-size", "2", "--refine-rounding-lr", "0.001",
             "--calibration-batch-size", "2"]
    _run_two(models, "llama", tmp_path / "a", *extra)
    _run_two(models, "llama", tmp_path / "b", *extra)
    assert _tensors_equal(tmp_path / "a", tmp_path / "b")
    _run_one(models, "llama", tmp_path / "one", *extra, "--statistics-dtype", "float64")
    same, logits = _agreement(tmp_path / "one", tmp_path / "a")
    assert same >= 0.999 and logits <= 1e-3, (same, logits)


def test_a_killed_rank_fails_the_job_and_the_rerun_resumes(models, tmp_path):
    extra = ["--method", "gptaq", "--resume-dir", tmp_path / "resume"]
    run = _torchrun([WORKER, "kill", *_quantize_args(models, "llama", tmp_path / "out", *extra)],
                    env={"KILL_AFTER_BLOCK": "1", "KILL_RANK": "1"})
    assert run.returncode != 0
    assert not (tmp_path / "out").exists()  # nothing written as if it were done
    state = json.loads((tmp_path / "resume" / "state.json").read_text())
    assert state["blocks_done"] == 2 and state["fingerprint"]["world_size"] == 2
    assert sorted(f for f in state["files"] if f.startswith("stream_")) == [
        "stream_00002.rank000.safetensors", "stream_00002.rank001.safetensors"]
    # the same command again goes on after block 1, and gives what an uninterrupted run gives
    resumed = _run_two(models, "llama", tmp_path / "out", *extra)
    assert "resuming from" in resumed.stderr and "2 of 3 blocks were already done" in resumed.stderr
    _run_two(models, "llama", tmp_path / "plain", "--method", "gptaq")
    assert _tensors_equal(tmp_path / "out", tmp_path / "plain")
    # one process cannot take the two ranks' streams over
    one = _cli(_quantize_args(models, "llama", tmp_path / "one", *extra))
    assert one.returncode == 2 and "different number of ranks (2 -> 1" in one.stderr


def test_two_ranks_of_a_disk_offloaded_model(models, tmp_path):
    # each rank offloads its own copy, into its own folder, and the result is the in-memory one's
    offload = tmp_path / "offload"
    _run_two(models, "llama", tmp_path / "two", "--max-memory", "cpu=100KB", "--offload-folder", offload)
    assert sorted(p.name for p in offload.iterdir()) == ["rank000", "rank001"]
    assert any((offload / "rank001").iterdir())  # (something was offloaded there)
    _run_one(models, "llama", tmp_path / "one", "--statistics-dtype", "float64")
    assert _tensors_equal(tmp_path / "one", tmp_path / "two")


def test_too_few_windows_for_the_ranks_is_one_clear_error(models, tmp_path):
    run = _torchrun(["-m", "hf_astroquant", *_quantize_args(models, "llama", tmp_path / "o", "--n-samples", "1")])
    assert run.returncode != 0
    assert "1 calibration window(s) cannot be shared by 2 ranks" in run.stderr
    assert not (tmp_path / "o").exists()
