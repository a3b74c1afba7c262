"""The benchmark results flow one way: a bench script writes rows of one schema (benchmarks/results_rows.py)
into benchmarks/results/rows.jsonl, and update_readme.py renders every table from them, so a rerun
changes its table (and the ratios against it) with no change to the renderer."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def bench(tmp_path, monkeypatch):
    """The benchmarks' modules, writing to a copy of the rows."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import results_rows

    copy = tmp_path / "rows.jsonl"
    copy.write_text(results_rows.ROWS_FILE.read_text())
    monkeypatch.setattr(results_rows, "ROWS_FILE", copy)
    return results_rows


def _line(table: str, text: str) -> str:
    return next(line for line in table.splitlines() if text in line)


def test_a_rerun_replaces_its_row_and_the_ratios_against_it_follow(bench):
    import bench_quality
    from tables import SECTIONS

    gptq = next(r for r in bench.read_rows() if (r["table"], r["label"]) == ("ablation", "gptq-w4"))
    rerun = {**gptq["columns"], "quant_seconds": 2 * gptq["columns"]["quant_seconds"], "ppl": 24.0}
    for key in ("name", "configuration", "preconditioning"):
        rerun.pop(key)
    before = len(bench.read_rows())
    bench.append_rows([bench_quality.table_row(rerun, "ablation", {}, gptq["sitting"], machine="test")])
    rows = bench.read_rows()
    assert len(rows) == before and [r for r in rows if r["label"] == "gptq-w4" and r["table"] == "ablation"][0][
        "command"] == f"python benchmarks/bench_quality.py --rows gptq-w4 --table ablation --sitting {gptq['sitting']}"
    table = SECTIONS["ablation"].render(rows)
    assert _line(table, "| 4 | 64 | 24.00 | s5 | 333.8 | 1.00 |")  # the rerun, its own baseline
    gptaq = _line(table, "hf_astroquant GPTAQ (desc_act, static_groups, mse) | 4 | 64 | 23.91 | s5")
    assert "| 298.1 | 0.89 |" in gptaq  # 298.1 s against GPTQ's doubled 333.8 s, no longer 1.79


def test_a_new_peer_row_reaches_the_peers_tables(bench, monkeypatch):
    import argparse

    import protocol

    args = argparse.Namespace(table="peers", sitting="peers")
    row = {"tool": "AutoRound", "version": "9.9", "recipe": "light", "iters": 50, "lr": 0.005, "bits": 4,
           "group_size": 64, "domain": "out", "sym": False, "ppl": 20.5, "quant_seconds": 100.0}
    protocol.record_row(args, row, "AutoRound 9.9, recipe light (50 iterations, lr 0.005)")
    from tables import SECTIONS

    rows = bench.read_rows()
    assert "| AutoRound 9.9, recipe light (50 iterations, lr 0.005) | 4 | 64 | 20.50 | 100.0 |" in \
        SECTIONS["peers"].render(rows)
    assert "20.50 · 100 s" in _line(SECTIONS["peers-summary"].render(rows), "W4 g64")


def test_a_partial_measurement_merges_into_its_row(bench):
    bench.append_rows([bench.row("gguf", "gptq-Q4_0", {"decode_tok_s": 12.5}, command="c", machine="m")], merge=True)
    row = next(r for r in bench.read_rows() if (r["table"], r["label"]) == ("gguf", "gptq-Q4_0"))
    assert row["columns"]["decode_tok_s"] == 12.5 and row["columns"]["llamacpp_ppl"] and row["command"].endswith("; c")
