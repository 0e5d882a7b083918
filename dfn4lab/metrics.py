"""Speech enhancement metrics: ``score(clean, est, sr)`` and one function per metric.

Signals are 1-D ``(samples,)`` arrays of the same length, clean reference first. PESQ, STOI,
SI-SDR, SDR, segmental SNR, the composite measures, DNSMOS and the VAD run at 16 kHz (``METRIC_SR``,
the rate of the VoiceBank+DEMAND tables; PESQ wide-band and DNSMOS require it); log-spectral
distance runs at the signals' own rate, so it sees the full band.

A metric with no value for its input (silent reference, input too short) raises ``Undefined``;
``score`` turns that into the worst value of the metric's scale (``FLOOR``) and a flag, so results
never hold NaN. ``Undefined.scope`` says whether the cause is the test item (the reference or the
length: the same for every model) or the estimate (a model's fault, such as silence out).

The composite measures follow Hu & Loizou (2008) and Loizou's MATLAB ``composite.m`` frame for frame,
with wide-band PESQ at 16 kHz as in the VoiceBank+DEMAND literature.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dfn4lab.audio import as_float, resample

import numpy as np

METRIC_SR = 16000
METRICS = (
    "pesq",
    "stoi",
    "estoi",
    "si_sdr",
    "sdr",
    "ssnr",
    "csig",
    "cbak",
    "covl",
    "lsd",
    "dnsmos_sig",
    "dnsmos_bak",
    "dnsmos_ovrl",
    "dnsmos_p808",
    "vad_agree",
)
LOWER_IS_BETTER = frozenset({"lsd"})
CLAMP_DB = 100.0  # SI-SDR and SDR are clamped to +-this (identical signals would give +inf)
FLOOR = {  # the value an undefined metric gets: the worst of its scale
    "pesq": 1.0,
    "stoi": 0.0,
    "estoi": 0.0,
    "si_sdr": -CLAMP_DB,
    "sdr": -CLAMP_DB,
    "ssnr": -10.0,
    "csig": 1.0,
    "cbak": 1.0,
    "covl": 1.0,
    "lsd": 100.0,
    "dnsmos_sig": 1.0,
    "dnsmos_bak": 1.0,
    "dnsmos_ovrl": 1.0,
    "dnsmos_p808": 1.0,
    "vad_agree": 0.0,
}
SILENCE_RMS = 1e-5  # -100 dBFS: below this a signal counts as silent
SDR_FILTER = 512  # BSS-eval distortion filter taps
DNSMOS_MIN_S = 1.0  # shorter clips would be tiled dozens of times to fill DNSMOS's 9 s window


class Undefined(ValueError):
    """A metric without a value for this input. ``scope`` is "item" (the reference or the length is the
    cause, so every model shares it) or "estimate" (the enhanced signal is the cause)."""

    def __init__(self, reason: str, scope: str = "item"):
        super().__init__(reason)
        self.scope = scope


def _is_silent(x: np.ndarray) -> bool:
    return x.size == 0 or float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) < SILENCE_RMS


def _check_reference(clean: np.ndarray, min_samples: int = 1) -> None:
    if clean.size < min_samples:
        raise Undefined(f"shorter than {min_samples} samples")
    if _is_silent(clean):
        raise Undefined("silent reference")


# --- PESQ, STOI ------------------------------------------------------------------------------------


def pesq_wb(clean: np.ndarray, est: np.ndarray) -> float:
    """Wide-band PESQ (ITU-T P.862.2, MOS-LQO 1.04..4.64) of 16 kHz signals."""
    from pesq import PesqError, pesq

    _check_reference(clean, METRIC_SR // 4)  # the library's own minimum: 1/4 s
    if _is_silent(est):
        raise Undefined("silent estimate", "estimate")
    try:
        return float(pesq(METRIC_SR, clean, est, "wb"))
    except (PesqError, ValueError) as e:  # ValueError: NaN inside the C code on degenerate input
        try:  # the reference alone fails too ("No utterances detected"): the item's fault, every model's
            pesq(METRIC_SR, clean, clean, "wb")
        except (PesqError, ValueError):
            raise Undefined(f"PESQ failed on the reference itself: {e}", "item") from e
        raise Undefined(f"PESQ failed: {e}", "estimate") from e


def stoi(clean: np.ndarray, est: np.ndarray, sr: int, extended: bool = False) -> float:
    """STOI (Taal et al. 2011) or, with ``extended``, ESTOI (Jensen & Taal 2016); ~0..1."""
    from pystoi import stoi as _stoi

    # pystoi needs 30 frames of 256 samples (hop 128) at 10 kHz, ~0.4 s, and fails below one frame
    _check_reference(clean, math.ceil(0.4 * sr))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(_stoi(clean, est, sr, extended=extended))
    if caught:  # pystoi warns (and returns 1e-5) when too few speech frames remain after its VAD
        raise Undefined(f"too short: {caught[0].message}")
    return value


# --- SI-SDR, SDR (BSS-eval, as ESPnet scores them) -------------------------------------------------


def si_sdr(clean: np.ndarray, est: np.ndarray) -> float:
    """Scale-invariant SDR (Le Roux et al. 2019) in dB, clamped to +-``CLAMP_DB``."""
    import fast_bss_eval

    _check_reference(clean)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = fast_bss_eval.si_sdr(_f64(clean)[None], _f64(est)[None], clamp_db=CLAMP_DB)
    return float(v[0])


def sdr(clean: np.ndarray, est: np.ndarray) -> float:
    """BSS-eval SDR (Vincent et al. 2006; a 512-tap distortion filter is allowed) in dB."""
    import fast_bss_eval

    _check_reference(clean, 4 * SDR_FILTER)  # shorter signals let the filter fit anything
    with np.errstate(divide="ignore", invalid="ignore"):
        v = fast_bss_eval.sdr(_f64(clean)[None], _f64(est)[None], filter_length=SDR_FILTER, clamp_db=CLAMP_DB)
    return float(v[0])


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# --- Loizou's frame-based measures: segmental SNR, LLR, WSS, composite ------------------------------


def _loizou_frames(x: np.ndarray, sr: int) -> np.ndarray:
    """30 ms frames, 75 % overlap, Loizou's Hann window and frame count: (samples,) -> (frames, win)."""
    win = round(0.03 * sr)
    hop = win // 4
    n = (len(x) - win) // hop  # composite.m: floor(len/hop - win/hop)
    if n < 1:
        raise Undefined("shorter than two 30 ms frames")
    window = 0.5 * (1 - np.cos(2 * np.pi * np.arange(1, win + 1) / (win + 1)))
    frames = np.lib.stride_tricks.sliding_window_view(_f64(x), win)[::hop][:n]
    return frames * window


def _trimmed_mean(d: np.ndarray, keep: float = 0.95) -> float:
    """Mean of the lowest ``keep`` fraction (composite.m drops the worst 5 % of frames)."""
    n = max(1, int(np.floor(len(d) * keep + 0.5)))  # MATLAB's round
    return float(np.mean(np.sort(d)[:n]))


def segmental_snr(clean: np.ndarray, est: np.ndarray, sr: int) -> float:
    """Segmental SNR in dB, each frame clipped to [-10, 35] (Loizou's ``snr`` in composite.m)."""
    _check_reference(clean)
    c, e = _loizou_frames(clean, sr), _loizou_frames(est, sr)
    eps = np.finfo(np.float64).eps
    seg = 10 * np.log10(np.sum(c**2, 1) / (np.sum((c - e) ** 2, 1) + eps) + eps)
    return float(np.mean(np.clip(seg, -10, 35)))


def llr(clean: np.ndarray, est: np.ndarray, sr: int) -> float:
    """Log-likelihood ratio of the LPC models of each frame (>= 0), 95 % trimmed mean."""
    _check_reference(clean)
    order = 10 if sr < 10000 else 16
    c, e = _loizou_frames(clean, sr), _loizou_frames(est, sr)
    # A white floor at -100 dBFS keeps every autocorrelation matrix positive definite, so silent
    # frames get a finite LPC model (flat) instead of a singular system.
    floor = c.shape[1] * SILENCE_RMS**2
    r_c, r_e = _autocorr(c, order, floor), _autocorr(e, order, floor)
    a_c, a_e = _lpc(r_c), _lpc(r_e)
    t_c = _toeplitz(r_c)
    num = np.einsum("ni,nij,nj->n", a_e, t_c, a_e)
    den = np.einsum("ni,nij,nj->n", a_c, t_c, a_c)
    return _trimmed_mean(np.log(num / den))


def _autocorr(frames: np.ndarray, order: int, floor: float) -> np.ndarray:
    """Biased autocorrelation lags 0..order: (frames, win) -> (frames, order + 1)."""
    win = frames.shape[1]
    r = np.stack([np.sum(frames[:, : win - k] * frames[:, k:], 1) for k in range(order + 1)], 1)
    r[:, 0] += floor
    return r


def _toeplitz(r: np.ndarray) -> np.ndarray:
    """Symmetric Toeplitz matrices from their first rows: (n, p) -> (n, p, p)."""
    p = r.shape[1]
    return r[:, np.abs(np.arange(p)[:, None] - np.arange(p)[None])]


def _lpc(r: np.ndarray) -> np.ndarray:
    """Prediction-error filters [1, -a_1, ..., -a_p] from autocorrelations (n, p + 1) (the normal
    equations Levinson-Durbin solves)."""
    a = np.linalg.solve(_toeplitz(r[:, :-1]), r[:, 1:, None])[..., 0]
    return np.concatenate([np.ones((len(r), 1)), -a], 1)


# Klatt's 25 critical bands (Hz), as in composite.m
_CENT = np.array(
    [50, 120, 190, 260, 330, 400, 470, 540, 617.372, 703.378, 798.717, 904.128, 1020.38, 1148.30,
     1288.72, 1442.54, 1610.70, 1794.16, 1993.93, 2211.08, 2446.71, 2701.97, 2978.04, 3276.17, 3597.63]
)  # fmt: skip
_BW = np.array(
    [70, 70, 70, 70, 70, 70, 70, 77.3724, 86.0056, 95.3398, 105.411, 116.256, 127.914, 140.423, 153.823,
     168.154, 183.457, 199.776, 217.153, 235.631, 255.255, 276.072, 298.126, 321.465, 346.136]
)  # fmt: skip


def wss(clean: np.ndarray, est: np.ndarray, sr: int) -> float:
    """Weighted spectral slope distance (Klatt 1982), 95 % trimmed mean over frames."""
    _check_reference(clean)
    c, e = _loizou_frames(clean, sr), _loizou_frames(est, sr)
    n_fft = 2 ** int(np.ceil(np.log2(2 * c.shape[1])))
    half = n_fft // 2
    f0 = np.floor(_CENT / (sr / 2) * half)
    bw = _BW / (sr / 2) * half
    filt = np.exp(
        -11 * ((np.arange(half)[None] - f0[:, None]) / bw[:, None]) ** 2 + np.log(_BW[0] / _BW)[:, None]
    )
    filt *= filt > np.exp(-30 / (2 * 2.303))  # cut at the -30 dB points

    def band_db(frames: np.ndarray) -> np.ndarray:  # (frames, win) -> (frames, 25)
        power = np.abs(np.fft.rfft(frames, n_fft))[:, :half] ** 2
        return 10 * np.log10(np.maximum(power @ filt.T, 1e-10))

    (w_c, s_c), (w_e, s_e) = _slope_weights(band_db(c)), _slope_weights(band_db(e))
    w = (w_c + w_e) / 2
    return _trimmed_mean(np.sum(w * (s_c - s_e) ** 2, 1) / np.sum(w, 1))


def _slope_weights(
    db: np.ndarray, k_max: float = 20.0, k_locmax: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Klatt's weights and spectral slopes of band energies (frames, 25) -> (frames, 24) each.

    The nearest peak is searched as composite.m does, including its index quirk (a rising slope
    takes the energy one band before the turning point); it keeps the weights positive.
    """
    slope = np.diff(db, axis=1)
    n, m = slope.shape
    right = np.empty((n, m), dtype=int)  # first band >= i whose slope is <= 0 (m if none)
    nxt = np.full(n, m)
    for i in range(m - 1, -1, -1):
        nxt = np.where(slope[:, i] <= 0, i, nxt)
        right[:, i] = nxt
    left = np.empty((n, m), dtype=int)  # last band <= i whose slope is > 0 (-1 if none)
    prv = np.full(n, -1)
    for i in range(m):
        prv = np.where(slope[:, i] > 0, i, prv)
        left[:, i] = prv
    idx = np.where(slope > 0, right - 1, left + 1)
    peak = np.take_along_axis(db, idx, axis=1)
    w_max = k_max / (k_max + db.max(1, keepdims=True) - db[:, :-1])
    w_loc = k_locmax / (k_locmax + peak - db[:, :-1])
    return w_max * w_loc, slope


def composite_from(pesq: float, llr: float, wss: float, ssnr: float) -> tuple[float, float, float]:
    """CSIG, CBAK, COVL from their ingredients (Hu & Loizou 2008, Table 5), each clipped to [1, 5]."""
    csig = 3.093 - 1.029 * llr + 0.603 * pesq - 0.009 * wss
    cbak = 1.634 + 0.478 * pesq - 0.007 * wss + 0.063 * ssnr
    covl = 1.594 + 0.805 * pesq - 0.512 * llr - 0.007 * wss
    return tuple(float(np.clip(v, 1.0, 5.0)) for v in (csig, cbak, covl))


def composite(clean: np.ndarray, est: np.ndarray, pesq: float | None = None) -> dict[str, float]:
    """CSIG, CBAK, COVL of 16 kHz signals (``pesq``: their wide-band PESQ, if already computed)."""
    pesq = pesq_wb(clean, est) if pesq is None else pesq
    parts = llr(clean, est, METRIC_SR), wss(clean, est, METRIC_SR), segmental_snr(clean, est, METRIC_SR)
    return dict(zip(("csig", "cbak", "covl"), composite_from(pesq, *parts), strict=True))


# --- Log-spectral distance -------------------------------------------------------------------------


def lsd(clean: np.ndarray, est: np.ndarray, n_fft: int = 2048, hop: int = 512, eps: float = 1e-10) -> float:
    """Log-spectral distance in dB: per frame the RMS over bins of the power-spectrum difference in dB,
    averaged over frames (STFT ``n_fft``/``hop`` at the signals' rate). Bins where the reference is
    silent count at ``eps``, so residual noise there weighs heavily; a silent reference is undefined."""
    import librosa

    _check_reference(clean)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # librosa warns when n_fft exceeds a very short input
        p_c, p_e = (np.abs(librosa.stft(_f64(x), n_fft=n_fft, hop_length=hop)) ** 2 for x in (clean, est))
    d = 10 * np.log10(p_c + eps) - 10 * np.log10(p_e + eps)  # (freq, frames)
    return float(np.mean(np.sqrt(np.mean(d**2, axis=0))))


# --- Non-intrusive: DNSMOS; VAD agreement ----------------------------------------------------------


def dnsmos(est: np.ndarray) -> dict[str, float]:
    """DNSMOS P.835 (SIG, BAK, OVRL) and P.808 of a 16 kHz signal, with the ONNX models bundled in
    ``speechmos``. Samples are clipped to [-1, 1], as a PCM file of the signal would hold them."""
    from speechmos import dnsmos as _dnsmos

    if est.size < DNSMOS_MIN_S * METRIC_SR:
        raise Undefined(f"shorter than {DNSMOS_MIN_S:g} s")
    if _is_silent(est):
        raise Undefined("silent estimate", "estimate")
    r = _dnsmos.run(np.clip(est, -1, 1).astype(np.float32), METRIC_SR)
    keys = {
        "dnsmos_sig": "sig_mos",
        "dnsmos_bak": "bak_mos",
        "dnsmos_ovrl": "ovrl_mos",
        "dnsmos_p808": "p808_mos",
    }
    return {k: float(r[v]) for k, v in keys.items()}


@functools.cache
def _vad_model():
    import torch

    threads = torch.get_num_threads()
    from silero_vad import load_silero_vad

    torch.set_num_threads(threads)  # importing silero_vad sets torch to one thread for the whole process
    return load_silero_vad(sequence=True)  # the ONNX model, run by onnxruntime in blocks of frames


def vad_probs(x: np.ndarray) -> np.ndarray:
    """Silero VAD speech probability per 32 ms frame of a 16 kHz signal: (samples,) -> (frames,)."""
    return _vad_model().audio_forward(np.asarray(x, np.float32), METRIC_SR)


def vad_agreement(clean: np.ndarray, est: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of 32 ms frames where Silero VAD decides alike (speech or not) on clean and estimate."""
    if clean.size < 512:
        raise Undefined("shorter than one VAD frame (32 ms)")
    return float(np.mean((vad_probs(clean) > threshold) == (vad_probs(est) > threshold)))


# --- Everything at once ----------------------------------------------------------------------------


@dataclass
class _Pair:
    clean: np.ndarray
    est: np.ndarray
    sr: int
    clean16: np.ndarray
    est16: np.ndarray
    pesq: float | None = None


def _pesq(p: _Pair) -> dict[str, float]:
    p.pesq = pesq_wb(p.clean16, p.est16)
    return {"pesq": p.pesq}


_GROUPS: list[tuple[tuple[str, ...], Callable[[_Pair], dict[str, float]]]] = [
    (("pesq",), _pesq),
    (("stoi",), lambda p: {"stoi": stoi(p.clean16, p.est16, METRIC_SR)}),
    (("estoi",), lambda p: {"estoi": stoi(p.clean16, p.est16, METRIC_SR, extended=True)}),
    (("si_sdr",), lambda p: {"si_sdr": si_sdr(p.clean16, p.est16)}),
    (("sdr",), lambda p: {"sdr": sdr(p.clean16, p.est16)}),
    (("ssnr",), lambda p: {"ssnr": segmental_snr(p.clean16, p.est16, METRIC_SR)}),
    (("csig", "cbak", "covl"), lambda p: composite(p.clean16, p.est16, p.pesq)),
    (("lsd",), lambda p: {"lsd": lsd(p.clean, p.est)}),
    (("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808"), lambda p: dnsmos(p.est16)),
    (("vad_agree",), lambda p: {"vad_agree": vad_agreement(p.clean16, p.est16)}),
]


def score(
    clean: np.ndarray, est: np.ndarray, sr: int, metrics: Sequence[str] = METRICS
) -> tuple[dict[str, float], dict[str, str]]:
    """Every metric in ``metrics`` of ``est`` against ``clean`` (both (samples,) at ``sr``; float in
    [-1, 1], or integer PCM, which is scaled to it).

    Returns ``(values, flags)``: values are finite floats; ``flags`` maps each metric that had no value
    (and so got ``FLOOR``) to "item: reason" or "estimate: reason" (see ``Undefined``).
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {', '.join(METRICS)}")
    if np.ndim(clean) != 1 or np.ndim(est) != 1:  # (samples, channels) would be scored interleaved
        raise ValueError(
            f"score takes mono (samples,) signals, got shapes {np.shape(clean)} and {np.shape(est)}"
        )
    clean, est = as_float(clean), as_float(est)
    if clean.shape != est.shape or clean.size == 0:
        raise ValueError(f"need two non-empty signals of one length, got {clean.shape} and {est.shape}")
    bad = next((n for n, x in (("item", clean), ("estimate", est)) if not np.isfinite(x).all()), None)
    if bad is None:
        c16, e16 = (x if sr == METRIC_SR else resample(x, sr, METRIC_SR) for x in (clean, est))
        pair = _Pair(clean, est, sr, c16.astype(np.float64), e16.astype(np.float64))
    values: dict[str, float] = {}
    flags: dict[str, str] = {}
    for names, fn in _GROUPS:
        wanted = [m for m in names if m in metrics]
        if not wanted:
            continue
        try:
            if bad is not None:  # the libraries answer NaN or raise deep inside
                raise Undefined(f"NaN or inf {'reference' if bad == 'item' else 'estimate'}", bad)
            got = fn(pair)
        except Undefined as e:
            got = {m: FLOOR[m] for m in names}
            flags.update({m: f"{e.scope}: {e}" for m in wanted})
        values.update({m: got[m] for m in wanted})
    return {m: values[m] for m in METRICS if m in values}, flags
