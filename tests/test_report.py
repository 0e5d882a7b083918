"""README's generated results block: built from a benchmark's real saved output, replaced in place."""

from __future__ import annotations

import json

from dfn4lab import bench, paths, report

import mlx.core as mx


def test_bench_result_reaches_the_readme_block(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "FIGURES", tmp_path)
    assert bench.main(["enhance", "--quick", "--repeats", "1"]) == 0
    saved = json.loads((tmp_path / "quick" / "bench_enhance.json").read_text())
    assert {"official_s", "dfn4lab_s", "speedup", "agreement_snr_db", "env"} <= set(saved)
    block = report.results(figures=tmp_path / "quick", eval_dir=tmp_path / "no-eval")
    assert block.startswith(report.BEGIN) and block.endswith(report.END)
    assert f"speedup {saved['speedup']:.2f}" in block
    assert "No evaluation" in block  # missing results are named, not invented

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{report.BEGIN}\nold numbers\n{report.END}\nafter\n")
    assert report.update(readme, block)
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("# title\n\nbefore\n") and text.endswith("\nafter\n")
    assert report.update(readme, block) and readme.read_text() == text  # idempotent

    # the end marker quoted before the block
    readme.write_text(f"the block ends at {report.END}\n{report.BEGIN}\nold\n{report.END}\n")
    assert report.update(readme, block) and readme.read_text().startswith(f"the block ends at {report.END}\n")
    assert "\nold\n" not in readme.read_text()

    readme.write_text("no markers\n")
    assert not report.update(readme, block) and readme.read_text() == "no markers\n"


def test_the_official_comparison_names_only_the_metrics_evaluated():
    from dfn4lab import evaluate

    rows = [
        {"model": m, "file": f, "snr": 5.0, "flags": "", "dropouts": 0, "stoi": v + i / 10}
        for i, f in enumerate("ab")
        for m, v in (("noisy", 0.5), ("official", 0.8), ("dfn3", 0.8))
    ]
    s = evaluate.summarize(rows, ["stoi"])  # --metrics stoi: no PESQ, no SI-SDR (a KeyError before)
    assert report._official_vs_dfn3(s) == []
    s = evaluate.summarize([{**r, "pesq": 2.0} for r in rows], ["stoi", "pesq"])
    (line,) = report._official_vs_dfn3(s)
    assert "PESQ 0.000" in line and "SI-SDR" not in line


def test_backbone_bench_row_names_each_batch_ratio(tmp_path):
    """The README row gives MLX/PyTorch per inference batch (they differ: 0.64-0.83 in one run), not
    only the largest batch's."""
    s = bench.backbones(quick=True, repeats=1, out_dir=tmp_path)
    (row,) = [r for r in report.bench_table(tmp_path) if "`backbones`" in r]
    b1, b2 = s["mlx_vs_torch_infer_b1"], s["mlx_vs_torch_infer_b2"]
    dev = bench.torch_device("auto", mlx_gpu=mx.default_device().type == mx.DeviceType.gpu)
    where = f"(MLX on {mx.default_device().type.name}, PyTorch on {dev})"
    assert f"MLX/PyTorch {where} inference {b1:.2f} / {b2:.2f} (batch 1/2)" in row
    ops = "MLX ops only" in row
    assert ops == ("mamba_vs_gru_step_mlx_ops" in s) == (s["kernels"] == "on")  # only where measured
    assert f"training step {s['mlx_vs_torch_step']:.2f}" in row
