"""Configuration dataclasses (DSP, backbone, model) with JSON round trip, and presets as data.

Presets are plain dictionaries of overrides on the defaults; ``preset("dfn3")`` is exactly
DeepFilterNet3 as shipped in the official ``config.ini``.
"""

from __future__ import annotations

import configparser
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dfn4lab.paths import atomic_write

T = TypeVar("T")


def from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from a (nested) dict as JSON gives it: nested dataclasses built, lists
    turned back into the tuples the fields declare. An unknown key or a value of the wrong kind (a
    string for a number...) raises ValueError naming it: a typo in a config never passes silently."""
    if not isinstance(d, dict):
        raise ValueError(f"a {cls.__name__} must be a JSON object, got {type(d).__name__}")
    _check_names(cls, d)
    hints = typing.get_type_hints(cls)
    return cls(**{k: _as_field(hints[k], v, f"{cls.__name__}.{k}") for k, v in d.items()})


def replace_fields(obj: T, **overrides: Any) -> T:
    """``dataclasses.replace`` with a ValueError (not a TypeError) naming unknown fields."""
    _check_names(type(obj), overrides)
    return dataclasses.replace(obj, **overrides)  # type: ignore[type-var]


def _check_names(cls: type, d: dict[str, Any]) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {', '.join(unknown)}; known: {', '.join(names)}")


_SCALARS = (bool, int, float, str)


def _as_field(t: Any, v: Any, name: str) -> Any:
    """``v`` as a field of type ``t`` holds it; ``t`` may be optional (``tuple[float, ...] | None``)."""
    union = typing.get_origin(t) in (typing.Union, types.UnionType)
    arms = typing.get_args(t) if union else (t,)
    for arm in arms:
        if arm is type(None) or arm in _SCALARS:
            if v is None if arm is type(None) else _is_scalar(v, arm):
                return v
        elif dataclasses.is_dataclass(arm):
            if isinstance(v, dict):
                return from_dict(arm, v)
        elif typing.get_origin(arm) is tuple:
            if isinstance(v, list | tuple):
                args = typing.get_args(arm)
                items = [a for a in args if a is not Ellipsis] or [Any]
                if Ellipsis not in args and len(v) != len(items):
                    raise ValueError(f"{name} must hold {len(items)} values, got {v!r}")
                return tuple(_as_field(items[min(i, len(items) - 1)], x, name) for i, x in enumerate(v))
        else:  # dicts of overrides, Any: checked where they are used
            return v
    raise ValueError(f"{name} must be {getattr(t, '__name__', t)}, got {v!r}")


def _is_scalar(v: Any, t: type) -> bool:
    """JSON's ``v`` as a value of ``t``: an int is a float too, a bool is no number."""
    if t is float:
        return isinstance(v, int | float) and not isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, t)


def is_json_text(s_or_path: str | Path) -> bool:
    """Whether ``s_or_path`` is JSON text (an object or array), not a file name."""
    return str(s_or_path).lstrip()[:1] in ("{", "[")


def read_json(s_or_path: str | Path) -> Any:
    """A JSON text, or the JSON file it names: a missing file or bad JSON raises one error that names
    the file."""
    if is_json_text(s_or_path):
        return json.loads(str(s_or_path))
    p = Path(s_or_path)
    if not p.is_file():
        where = "" if p.is_absolute() else f" (relative to the current folder, {Path.cwd()})"
        raise FileNotFoundError(f"no such config file: {p}{where}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


class JsonConfig:
    """JSON round trip of a config dataclass; the class reads it back with ``from_dict``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self, path: str | Path | None = None) -> str:
        """The config as JSON, also written (atomically) to ``path`` if given."""
        s = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            atomic_write(path, s + "\n")
        return s


@dataclass(frozen=True)
class DspConfig:
    """STFT, ERB and feature-normalisation settings (libDF's ``DF`` state)."""

    sr: int = 48000
    fft_size: int = 960
    hop_size: int = 480
    nb_erb: int = 32
    nb_df: int = 96
    norm_tau: float = 1.0  # seconds of the exponential mean used by both feature norms
    min_nb_erb_freqs: int = 2

    def __post_init__(self) -> None:
        names = ("sr", "fft_size", "hop_size", "nb_erb", "nb_df", "min_nb_erb_freqs")
        sizes = {k: getattr(self, k) for k in names}
        if any(v < 1 for v in sizes.values()) or not self.norm_tau > 0:
            raise ValueError(f"dsp sizes must be >= 1 and norm_tau > 0: {sizes}, norm_tau={self.norm_tau}")
        if self.hop_size > self.fft_size or max(self.nb_erb, self.nb_df) > self.freq_bins:
            raise ValueError(
                f"dsp: hop_size ({self.hop_size}) <= fft_size ({self.fft_size}) and nb_erb ({self.nb_erb}), "
                f"nb_df ({self.nb_df}) <= the {self.freq_bins} frequency bins"
            )

    @property
    def freq_bins(self) -> int:
        return self.fft_size // 2 + 1

    @property
    def alpha(self) -> float:
        """exp(-hop/sr/tau), rounded as libDF does: fewest decimals (>= 3) that stay below 1."""
        a = math.exp(-self.hop_size / self.sr / self.norm_tau)
        for decimals in range(3, 16):
            r = round(a, decimals)
            if r < 1.0:
                return r
        return a


# The temporal cores ``backbones.make_core`` builds; a new core adds its name here (and a branch there).
BACKBONES = ("gru", "mamba", "attention")


@dataclass(frozen=True)
class BackboneConfig:
    """The temporal model used at every recurrent site (encoder, ERB decoder, DF decoder)."""

    kind: str = "gru"  # one of BACKBONES
    # mamba
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    chunk: int = 32  # scan chunk length: bounds the exp() range of the closed form
    # sequential: the recurrence (measured 9-35x faster on CPU); chunked: SSD-style closed form per chunk
    scan: str = "sequential"
    # attention
    heads: int = 4
    window: int | None = None  # sliding window in frames; None = full causal
    ffn_mult: int = 2

    def __post_init__(self) -> None:
        if self.kind not in BACKBONES:
            raise ValueError(f"backbone kind {self.kind!r}: one of {', '.join(BACKBONES)}")
        if self.scan not in ("sequential", "chunked"):
            raise ValueError(f"backbone scan {self.scan!r}: sequential or chunked")
        sizes = {k: getattr(self, k) for k in ("d_state", "d_conv", "expand", "chunk", "heads", "ffn_mult")}
        if self.window is not None:
            sizes["window"] = self.window
        if any(v < 1 for v in sizes.values()):
            raise ValueError(f"backbone sizes must be >= 1, got {sizes}")


@dataclass(frozen=True)
class ModelConfig(JsonConfig):
    """DfNet4. With ``preset("dfn3")`` it is exactly DeepFilterNet3."""

    dsp: DspConfig = field(default_factory=DspConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    df_order: int = 5
    df_lookahead: int = 2
    conv_lookahead: int = 2
    conv_ch: int = 64
    conv_kernel_inp: tuple[int, int] = (3, 3)
    conv_kernel: tuple[int, int] = (1, 3)
    convt_kernel: tuple[int, int] = (1, 3)
    emb_hidden_dim: int = 256
    emb_num_layers: int = 3  # 1 in the encoder, the rest in the ERB decoder
    enc_linear_groups: int = 32
    linear_groups: int = 16
    df_linear_groups: int = 8  # DFN3's DF-decoder backbone keeps upstream's default of 8
    df_hidden_dim: int = 256
    df_num_layers: int = 2
    df_pathway_kernel_size_t: int = 5
    df_gru_skip: str = "groupedlinear"  # none | identity | groupedlinear
    enc_concat: bool = False
    lsnr_min: float = -15.0
    lsnr_max: float = 35.0
    # DFN4 extras (all off in dfn3)
    multires_df: tuple[tuple[int, int], ...] = ()  # extra (bins, order) DF heads sharing the backbone
    adaptive_order: bool = False
    hybrid_encoder: bool = False
    lsnr_dropout: bool = False
    complex_gain: bool = False
    mask_pf: bool = False
    pf_beta: float = 0.02
    atten_lim_db: float | None = None
    running_stats: bool = False

    def __post_init__(self) -> None:
        """Reject what the network cannot be built for, in one line (a config file's typo included)."""
        pairs = {k: getattr(self, k) for k in ("conv_kernel_inp", "conv_kernel", "convt_kernel")}
        pairs |= {f"multires_df[{i}]": head for i, head in enumerate(self.multires_df)}
        for k, v in pairs.items():
            if len(v) != 2:
                raise ValueError(f"ModelConfig.{k} must hold 2 values, got {v!r}")
        if not 0 <= self.df_lookahead <= min(self.conv_lookahead, self.df_order - 1):
            raise ValueError(
                f"df_lookahead={self.df_lookahead} must be in 0..min(conv_lookahead, df_order - 1) = "
                f"0..{min(self.conv_lookahead, self.df_order - 1)}: the deep filter reads frames the "
                "encoder has seen, and at least the current one"
            )
        if tuple(self.convt_kernel) != (1, 3):
            raise ValueError(f"convt_kernel={self.convt_kernel}: only DeepFilterNet3's (1, 3) is implemented")
        if self.conv_kernel[0] != 1:  # the inner convs keep no time history between streamed frames
            raise ValueError(f"conv_kernel={self.conv_kernel}: only one frame in time is implemented (1, k)")
        kernels = {"conv_kernel_inp": self.conv_kernel_inp, "conv_kernel": self.conv_kernel}
        if any(k < 1 for ks in kernels.values() for k in ks) or any(
            ks[1] % 2 == 0 for ks in kernels.values()
        ):
            raise ValueError(f"kernels {kernels}: sizes >= 1, odd in frequency (they keep the band count)")
        if self.dsp.nb_erb % 8 or self.dsp.nb_df % 2:
            raise ValueError(
                f"nb_erb={self.dsp.nb_erb} must divide by 8 and nb_df={self.dsp.nb_df} by 2: the encoder "
                "halves the bands three times (erb) and once (df)"
            )
        sizes = ("df_order", "conv_ch", "emb_hidden_dim", "df_hidden_dim")
        sizes += ("enc_linear_groups", "linear_groups", "df_linear_groups")
        if any(getattr(self, k) < 1 for k in sizes):
            raise ValueError(f"model sizes must be >= 1, got { ({k: getattr(self, k) for k in sizes}) }")
        if self.pf_beta < 0 or (self.atten_lim_db is not None and self.atten_lim_db < 0):
            raise ValueError(
                f"pf_beta={self.pf_beta} and atten_lim_db={self.atten_lim_db} must be >= 0 "
                "(atten_lim_db: the most noise is attenuated, in dB; None: no limit)"
            )
        counts = {
            "emb_num_layers >= 2": self.emb_num_layers >= 2,
            "df_num_layers >= 1": self.df_num_layers >= 1,
            "df_pathway_kernel_size_t >= 1": self.df_pathway_kernel_size_t >= 1,
            "lsnr_min < lsnr_max": self.lsnr_min < self.lsnr_max,
        }
        if not all(counts.values()):  # upstream refuses these too (a GRU of 0 layers)
            raise ValueError(f"model config needs {', '.join(k for k, ok in counts.items() if not ok)}")
        if self.df_gru_skip not in ("none", "identity", "groupedlinear"):
            raise ValueError(f"df_gru_skip={self.df_gru_skip!r}: none, identity or groupedlinear")
        if self.df_gru_skip == "identity" and self.conv_ch * self.dsp.nb_erb // 4 != self.df_hidden_dim:
            raise ValueError(
                f"df_gru_skip identity adds the embedding ({self.conv_ch * self.dsp.nb_erb // 4}) to the "
                f"DF backbone's output: df_hidden_dim must equal it, got {self.df_hidden_dim}"
            )
        for bins, order in self.multires_df:
            if not (0 < bins <= self.dsp.nb_df and order >= 1):
                raise ValueError(
                    f"multires_df head ({bins}, {order}): needs 0 < bins <= nb_df and order >= 1"
                )

    @classmethod
    def from_json(cls, s_or_path: str | Path) -> ModelConfig:
        return from_dict(cls, read_json(s_or_path))

    def replace(self, **overrides: Any) -> ModelConfig:
        """Copy with overrides; ``backbone="mamba"`` or ``backbone={...}`` set the backbone."""
        bb = overrides.pop("backbone", None)
        if isinstance(bb, str):
            overrides["backbone"] = replace_fields(self.backbone, kind=bb)
        elif isinstance(bb, dict):
            overrides["backbone"] = replace_fields(self.backbone, **bb)
        elif bb is not None:
            overrides["backbone"] = bb
        dsp = overrides.pop("dsp", None)
        if isinstance(dsp, dict):
            overrides["dsp"] = replace_fields(self.dsp, **dsp)
        elif dsp is not None:
            overrides["dsp"] = dsp
        return replace_fields(self, **overrides)


# Presets are data: overrides on the defaults above (which are DeepFilterNet3's).
PRESETS: dict[str, dict[str, Any]] = {
    "dfn3": {},
    "dfn4": {
        "backbone": {"kind": "mamba"},
        "multires_df": ((48, 3), (24, 2)),
        "adaptive_order": True,
        "hybrid_encoder": True,
        "lsnr_dropout": True,
        "running_stats": True,
    },
    "dfn4-lite": {
        "backbone": {"kind": "mamba"},
        "conv_ch": 32,
        "emb_hidden_dim": 128,
        "df_hidden_dim": 128,
        "emb_num_layers": 2,
        "df_num_layers": 1,
        "enc_linear_groups": 16,
        "linear_groups": 8,
        "df_linear_groups": 8,
    },
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """``preset("dfn4", backbone="gru")``: a named preset with overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    base = ModelConfig().replace(**{k: v for k, v in PRESETS[name].items()})
    return base.replace(**overrides) if overrides else base


def from_ini(path: str | Path) -> ModelConfig:
    """Read an upstream DeepFilterNet3 ``config.ini`` ([df] and [deepfilternet] sections). A missing
    field, another model (``[train] model``) or an option this network does not implement is a
    ValueError naming it, never a silently different network."""
    ini = configparser.ConfigParser()
    try:
        if not ini.read(path):
            raise FileNotFoundError(f"no such config file: {path}")
    except configparser.Error as e:
        raise ValueError(f"{path}: not an INI file ({str(e).splitlines()[0]})") from None
    for section in ("df", "deepfilternet"):
        if section not in ini:
            raise ValueError(f"{path}: no [{section}] section")
    df, net = ini["df"], ini["deepfilternet"]
    model = ini.get("train", "model", fallback="deepfilternet3").lower()
    if model != "deepfilternet3":
        raise ValueError(f"{path}: [train] model = {model}; only deepfilternet3 configs are read")
    unsupported = {  # options of upstream's DeepFilterNet3 that change the network: their default only
        "emb_gru_skip": ("none", net.get("emb_gru_skip", "none").lower()),
        "emb_gru_skip_enc": ("none", net.get("emb_gru_skip_enc", "none").lower()),
        "dfop_method": ("df", net.get("dfop_method", "df").lower()),
        "df_n_iter": ("1", net.get("df_n_iter", "1")),
        **{k: ("False", str(ini.getboolean("train", k, fallback=False))) for k in ("mask_only", "df_only")},
    }
    for key, (default, value) in unsupported.items():
        if value != default:
            raise ValueError(f"{path}: {key} = {value} is not implemented (only {default})")

    def need(section: configparser.SectionProxy, key: str, kind: type = int):
        if key not in section:
            raise ValueError(f"{path}: [{section.name}] lacks {key}")
        return {int: section.getint, float: section.getfloat}[kind](key)

    def pair(s: str) -> tuple[int, int]:
        a, b = (int(x) for x in s.split(","))
        return (a, b)

    dsp = DspConfig(
        sr=need(df, "sr"),
        fft_size=need(df, "fft_size"),
        hop_size=need(df, "hop_size"),
        nb_erb=need(df, "nb_erb"),
        nb_df=need(df, "nb_df"),
        norm_tau=need(df, "norm_tau", float),
        min_nb_erb_freqs=df.getint("min_nb_erb_freqs", fallback=2),
    )
    return ModelConfig(
        dsp=dsp,
        df_order=need(df, "df_order"),
        df_lookahead=need(df, "df_lookahead"),
        lsnr_min=need(df, "lsnr_min", float),
        lsnr_max=need(df, "lsnr_max", float),
        conv_lookahead=need(net, "conv_lookahead"),
        conv_ch=need(net, "conv_ch"),
        conv_kernel_inp=pair(net.get("conv_kernel_inp", "3,3")),
        conv_kernel=pair(net.get("conv_kernel", "1,3")),
        convt_kernel=pair(net.get("convt_kernel", "1,3")),
        emb_hidden_dim=need(net, "emb_hidden_dim"),
        emb_num_layers=need(net, "emb_num_layers"),
        enc_linear_groups=need(net, "enc_linear_groups"),
        linear_groups=need(net, "linear_groups"),
        df_hidden_dim=need(net, "df_hidden_dim"),
        df_num_layers=need(net, "df_num_layers"),
        df_pathway_kernel_size_t=need(net, "df_pathway_kernel_size_t"),
        df_gru_skip=net.get("df_gru_skip", "none").lower(),
        enc_concat=net.getboolean("enc_concat", fallback=False),
        mask_pf=net.getboolean("mask_pf", fallback=False),
        pf_beta=net.getfloat("pf_beta", fallback=0.02),
        lsnr_dropout=net.getboolean("lsnr_dropout", fallback=False),
    )
