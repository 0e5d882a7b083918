"""README's result tables, regenerated from what ``make run`` saved: ``python -m dfn4lab.report``.

Reads the benchmark results in ``figures/`` (``bench_backbones.json`` from notebook 03,
``bench_enhance.json`` and ``bench_stream.json`` from ``python -m dfn4lab.bench``) and the evaluation
of notebook 05 (``data/eval/notebook/results.json``), and replaces the README's text between the
two markers below. Results that are missing are named in the output, never invented.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dfn4lab import paths
from dfn4lab.cli import command
from dfn4lab.paths import atomic_write

BEGIN = "<!-- results: written by `make run` (python -m dfn4lab.report); edits here are replaced -->"
END = "<!-- /results -->"
EVAL_METRICS = ("pesq", "estoi", "si_sdr", "dnsmos_ovrl")


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def bench_table(figures: Path) -> list[str]:
    """One row per saved benchmark: its headline numbers."""
    rows = []
    enh = _load(figures / "bench_enhance.json")
    if enh:
        rows.append(
            f"| `enhance` (10 s at 48 kHz, dfn3) | {enh['dfn4lab_s']:.3f} s vs official runtime "
            f"{enh['official_s']:.3f} s (speedup {enh['speedup']:.2f}); "
            f"agreement {enh['agreement_snr_db']:.0f} dB |"
        )
    st = _load(figures / "bench_stream.json")
    if st:
        cases = "; ".join(
            f"{c['model']} {c['backbone']}{' (native)' if c.get('engine') == 'native' else ''} "
            f"{c['median_ms']:.2f} / {c['p99_ms']:.1f}"
            for c in st["cases"]
        )
        if st.get("compiled"):
            cases += "; as compiled MLX hops: " + "; ".join(
                f"{c['model']} {c['backbone']} {c['median_ms']:.2f} / {c['p99_ms']:.1f}"
                for c in st["compiled"]
            )
        o = st["official"]
        rows.append(
            f"| `stream` (ms per 10 ms hop, median / p99) | {cases}; official runtime "
            f"{o['median_ms']:.2f} / {o['p99_ms']:.1f} |"
        )
    bb = _load(figures / "bench_backbones.json")
    if bb:
        s = bb["summary"]
        steps = ", ".join(f"{c['backbone']} {c['step_ms'] / 1e3:.2f} s" for c in s["cases"])
        ops = (
            f"; MLX ops only (no `dfn4lab.kernels`, as on Metal): Mamba/GRU "
            f"{s['mamba_vs_gru_step_mlx_ops']:.2f}, attention/GRU "
            f"{s['attention_vs_gru_step_mlx_ops']:.2f}, MLX/PyTorch "
            f"{s['mlx_ops_vs_torch_infer']:.2f} / {s['mlx_ops_vs_torch_step']:.2f}"
        )
        rows.append(
            f"| `backbones` (dfn3 topology, batch {bb['batch']}, {bb['frames']} frames, matched params) | "
            f"step: {steps}; Mamba/GRU {s['mamba_vs_gru_step']:.2f}, attention/GRU "
            f"{s['attention_vs_gru_step']:.2f}; MLX/PyTorch inference {s['mlx_vs_torch_infer']:.2f}, "
            f"training step {s['mlx_vs_torch_step']:.2f}{ops} |"
        )
    if not rows:
        return ["No benchmark results in `figures/` yet."]
    return ["| `python -m dfn4lab.bench ...` | result |", "|---|---|", *rows]


def eval_table(eval_dir: Path) -> list[str]:
    """Mean ± 95 % CI over the evaluation set per model (noise-only files left out), with the RTF."""
    from dfn4lab.evaluate import LABELS, mean_ci_text

    res = _load(eval_dir / "results.json")
    if res is None:
        return [f"No evaluation in `{eval_dir}` yet."]
    names = [m for m in EVAL_METRICS if m in res["metrics"]]
    head = f"| {Path(res['set']).name} ({res['files']} files) | " + " | ".join(LABELS[m] for m in names)
    lines = [
        head + " | RTF |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for model, stats in res["summary"]["overall"].items():
        rtf = res["models"][model].get("rtf")
        cells = [mean_ci_text(stats[m]) for m in names]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {'–' if not rtf else f'{rtf:.3f}'} |")
    where = eval_dir.relative_to(paths.PROJECT) if eval_dir.is_relative_to(paths.PROJECT) else eval_dir
    lines += ["", "Mean ± half-width of the 95 % CI over files (noise-only files left out; the notes in "
              f"`{where}/results.md` give n per metric and SNR bin)."]  # fmt: skip
    runs = [m for m in res["summary"]["overall"] if m not in ("noisy", "official", "dfn3")]
    if runs:
        lines += [f"{', '.join(runs)}: training runs (notebook 04's, in `data/runs/`), best checkpoint."]
    return lines


def results(figures: Path = paths.FIGURES, eval_dir: Path = paths.DATA / "eval" / "notebook") -> str:
    """The generated block, markers included."""
    env = (_load(figures / "bench_backbones.json") or {}).get("env", {})
    where = f" on {env['cpu']}" if "cpu" in env else ""
    body = [BEGIN, f"Measured by `make run`{where}; compare ratios, not absolutes.", ""]
    body += bench_table(figures) + [""] + eval_table(eval_dir) + [END]
    return "\n".join(body)


def update(readme: Path, block: str) -> bool:
    """Replace the marked block in ``readme`` (atomically); False when the markers are missing."""
    text = readme.read_text()
    start = text.find(BEGIN)
    end = text.find(END, start) if start >= 0 else -1
    if start < 0 or end < 0:
        return False
    atomic_write(readme, text[:start] + block + text[end + len(END) :])
    return True


@command
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dfn4lab.report", description=__doc__)
    ap.add_argument("readme", nargs="?", default=str(paths.PROJECT / "README.md"))
    a = ap.parse_args(argv)
    block = results()
    if not update(Path(a.readme), block):
        print(f"{a.readme}: no results markers ({BEGIN!r} ... {END!r})", file=sys.stderr)
        return 1
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
