"""dfn4lab.bench: what the numbers measure (no timed assertions: benchmarks are run, not tested)."""

from __future__ import annotations

from dfn4lab import bench, data
from dfn4lab.config import preset

import mlx.core as mx
import pytest


def test_peak_memory_is_the_case_own_not_the_other_live_cases():
    """Every case's model stays alive while the others are measured; their memory is not this case's."""
    cfg = preset("dfn3").replace(conv_ch=16, emb_hidden_dim=64, df_hidden_dim=64)
    _, fns, resident = bench._mlx_case(cfg, 2, 20)
    fns["step"]()  # compiled and warm
    alone = bench._peak_mb(fns["step"], resident())
    other = mx.zeros((64, 2**20))  # 256 MiB held by "another case"
    mx.eval(other)
    beside = bench._peak_mb(fns["step"], resident())
    # buffer reuse moves a peak by up to ~1 MiB between runs; counting the other case would add 256
    assert alone > resident() / 2**20 and beside == pytest.approx(alone, abs=4.0)


def test_batch_macs_count_attention_time_by_time_term():
    """Per batch item and frame the GRU's work is constant; causal attention's grows with the frames
    (what makes it costlier than the GRU at matched parameters), a 64-frame window's grows less."""
    base = preset("dfn3").replace(conv_ch=16, emb_hidden_dim=64, df_hidden_dim=64)
    gru, att = base, base.replace(backbone="attention")
    w64 = att.replace(backbone={"window": 64})
    per_frame = {
        n: [bench.batch_macs(c, 2, t) / (2 * t) for t in (100, 400)]
        for n, c in (("gru", gru), ("attention", att), ("w64", w64))
    }
    assert per_frame["gru"][1] == pytest.approx(per_frame["gru"][0], rel=0.02)  # + 2 look-ahead frames
    assert per_frame["attention"][1] > per_frame["attention"][0] * 1.05
    growth = {n: v[1] / v[0] for n, v in per_frame.items()}
    assert growth["w64"] < growth["attention"] and per_frame["w64"][1] < per_frame["attention"][1]


def test_pytorch_is_timed_in_its_own_process_with_its_own_settings():
    """In one process dfn4lab's passive OpenMP waiting and MLX's threads slowed PyTorch's step 2x.
    PyTorch runs beside MLX's device; a plain-malloc process joins where dfn4lab tunes malloc (Linux)."""
    import os

    from dfn4lab import blas

    cfg = preset("dfn3").replace(conv_ch=16, emb_hidden_dim=64, df_hidden_dim=64)
    r = bench._mlx_vs_torch(cfg, 2, 20, 1)
    own = "" if "OMP_WAIT_POLICY" in blas.ENV_SET else os.environ.get("OMP_WAIT_POLICY", "")
    tuned = r["torch_env"]["torch"]
    gpu = mx.default_device().type == mx.DeviceType.gpu
    assert r["devices"] == {"mlx": mx.default_device().type.name, "torch": bench.torch_device("auto", gpu)}
    assert tuned["device"] == r["devices"]["torch"] and tuned["OMP_WAIT_POLICY"] == own
    assert tuned["malloc_tuned"] == blas.keep_freed_memory()
    assert {"mlx_vs_torch_infer_b1", "mlx_vs_torch_infer_b2", "mlx_vs_torch_step"} <= set(r["ratios"])
    assert all(row["torch_ms"] > 0 and row["mlx_ms"] > 0 for row in r["infer"])
    table = bench.torch_table(r)
    assert f"MLX on {r['devices']['mlx']}, PyTorch on {r['devices']['torch']}." in table
    if not (tuned["malloc_tuned"] and tuned["device"] == "cpu"):
        assert "torch_glibc" not in r["torch_env"] and "mlx_vs_torch_glibc_step" not in r["ratios"]
        return
    plain = r["torch_env"]["torch_glibc"]
    assert plain["OMP_WAIT_POLICY"] == own and plain["malloc_tuned"] is False
    assert "mlx_vs_torch_glibc_step" in r["ratios"] and all(row["torch_glibc_ms"] > 0 for row in r["infer"])
    assert all(line.split("|")[5].strip() for line in table.splitlines()[4:])  # the glibc column is filled


def test_pytorch_device_is_the_one_beside_mlx(monkeypatch):
    """MLX on a GPU meets PyTorch on MPS (Apple) or CUDA: timing PyTorch on the CPU there would
    compare a GPU with a CPU; MLX on the CPU meets PyTorch on the CPU, whatever GPU is present."""
    import torch

    for mps, cuda, want in ((True, False, "mps"), (False, True, "cuda"), (False, False, "cpu")):
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda mps=mps: mps)
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert bench.torch_device("auto", mlx_gpu=True) == want
        assert bench.torch_device("auto", mlx_gpu=False) == "cpu"
    with pytest.raises(ValueError, match="PyTorch has no mps device here"):
        bench.torch_device("mps")


def test_an_unusable_pytorch_device_is_one_line_error(capsys):
    """The child's error reaches the user as one line (it had ended in "process ended (exit 1)")."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    have = "cpu, mps" if torch.backends.mps.is_available() else "cpu"
    argv = ["backbones", "--quick", "--repeats", "1", "--torch-device", "cuda"]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"error: PyTorch side of the benchmark: ValueError: PyTorch has no cuda device here (it has: {have})"
    )


@pytest.mark.skipif(not data.speech_files(), reason="no real speech: alsa-utils (Debian) or the demo corpus")
def test_enhance_does_not_time_the_official_runtime_start_up(monkeypatch):
    from dfn4lab import inference

    made = []
    real = inference.official_runtime

    def counted(*args, **kw):
        made.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(inference, "official_runtime", counted)
    timed = []
    real_timeit = bench.timeit

    def spy(fn, repeats=5, warmup=1):
        before = len(made)
        out = real_timeit(fn, repeats, warmup)
        timed.append(len(made) - before)
        return out

    monkeypatch.setattr(bench, "timeit", spy)
    bench.enhance(seconds=1.0, repeats=2)
    assert len(timed) == 4 and timed == [0, 0, 0, 0]  # no runtime built inside a timed call


def test_torch_table_has_a_ratio_per_row():
    row = {f"{n}_{q}ms": v for n, v in (("mlx", 8.0), ("torch", 10.0)) for q in ("", "q25_", "q75_")}
    step = {
        "batch": 8,
        **row,
        "mlx_ms": 30.0,
        "mlx_ops_ms": 45.0,
        "mlx_ops_q25_ms": 44.0,
        "mlx_ops_q75_ms": 46.0,
    }
    table = bench.torch_table({"frames": 500, "infer": [{"batch": 1, **row}], "step": step})
    lines = table.splitlines()
    assert lines[0].startswith("500 frames") and "| inference, batch 1 | 8.0 (8.0-8.0) | 10.0" in lines[4]
    assert lines[4].split("|")[4].strip() == "0.80" and lines[5].split("|")[4].strip() == "3.00"
    assert lines[5].split("|")[8].strip() == "4.50"  # MLX ops only over PyTorch (no glibc column here)
