"""Dynamic mixing: one noisy/clean training pair per (seed, epoch, index), as DeepFilterNet draws them.

Per sample: a speech segment (up to ``max_len_s``; shorter speech sits at a random offset in a
window that long), random EQ, 1-3 noise segments (each EQ'd, at unit RMS, at a random relative
gain; sometimes another speaker among them), reverb (the mixture gets the full RIR; the target keeps
the direct path and early reflections, its later tail decayed to -60 dB over ``target_rt60``, as
libDF's ``supress_late``: a long room's target stays somewhat reverberant), band limitation, the noise
scaled to an SNR drawn from a list (or a noise-only sample with a silent target), an overall gain,
clipping of the mixture only, and a guard against peaks above 1.

The SNR is exact between the returned ``clean`` and ``noise`` over the speech's span (``meta``'s
``offset`` and ``length``; the noise fills the window, so a short utterance is not heard at a higher
SNR than drawn): ``noisy = reverberant speech + noise`` (before clipping); without reverb and
clipping, ``noisy = clean + noise``.

Epochs read the speech list in seeded permutations laid end to end: with ``samples_per_epoch``
below the list's length, successive epochs take successive parts of a permutation, so every file
is used in turn (not only the first ``samples_per_epoch`` of the list, in every epoch).

Bad files met while reading are skipped (the next file of the list takes their place), counted in
``Mixer.report``; the sample drawn for (seed, epoch, index) does not depend on whether a bad file
was already known, because each slot draws its random numbers before the file is tried.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from dfn4lab import audio
from dfn4lab.data import augment, checks, synth
from dfn4lab.data.checks import BadFile, NoUsableFiles, Report
from dfn4lab.data.config import NOISE_ONLY_SNR, CheckConfig, DataConfig, MixConfig
from dfn4lab.data.lists import Entry, load_split

import numpy as np
import soundfile as sf


@dataclass
class Mixture:
    """One training sample; all signals float32 ``(samples,)`` of the same length."""

    noisy: np.ndarray
    clean: np.ndarray  # the target: dry (or early-reverberant) speech; zeros for noise-only samples
    noise: np.ndarray  # the additive noise inside ``noisy``
    snr: float  # dB between ``clean`` and ``noise``; NOISE_ONLY_SNR for noise-only samples
    meta: dict = field(default_factory=dict)


class _Bad(Exception):
    """A file that failed a check; ``whole``: the whole file fails (not only the stretch read)."""

    def __init__(self, bad: BadFile, whole: bool = True):
        self.bad, self.whole = bad, whole


class Mixer:
    """Draws ``Mixture`` samples from speech, noise and RIR lists; picklable (for worker processes)."""

    def __init__(
        self,
        speech: Sequence[Entry],
        noise: Sequence[Entry],
        rirs: Sequence[Entry] = (),
        cfg: MixConfig | None = None,
        check: CheckConfig | None = None,
        seed: int = 0,
        samples_per_epoch: int | None = None,
    ):
        if not speech:
            raise NoUsableFiles("no speech files to mix")
        if not noise:
            raise NoUsableFiles("no noise files to mix")
        self.speech, self.noise, self.rirs = list(speech), list(noise), list(rirs)
        self.cfg = cfg or MixConfig()
        self.check = check or CheckConfig()
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch or len(self.speech)
        self.report = Report()
        self._bad: set[str] = set()
        self._rir_cache: dict[str, np.ndarray] = {}
        self._order: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))  # (cycle, its permutation)

    @classmethod
    def from_config(cls, cfg: DataConfig, split: str = "train") -> Mixer:
        """The mixer of one split of a data config (its lists, mixing, checks and seed)."""
        f = load_split(cfg, split)
        return cls(f["speech"], f["noise"], f["rir"], cfg.mix, cfg.checks, cfg.seed, cfg.samples_per_epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rir_cache": {}}  # workers refill their own cache

    def files_digest(self) -> str:
        """SHA-256 of what this mixer reads: its lists (path, size, modification time of every file; a
        missing file counts as such) and settings. Files are not read: a file edited in place changes
        its time, which is enough to notice, and reading a corpus would not pay."""

        def size_time(path: str) -> tuple[int, int]:
            try:
                st = os.stat(path)
            except OSError:
                return -1, -1
            return st.st_size, st.st_mtime_ns

        files = [(e.path, *size_time(e.path)) for e in self.speech + self.noise + self.rirs]
        settings = (self.cfg, self.check, self.seed, self.samples_per_epoch)
        return hashlib.sha256(repr((files, settings)).encode()).hexdigest()

    def speech_index(self, epoch: int, index: int) -> int:
        """The speech file of sample ``index`` of ``epoch``: position ``epoch * len(self) + index`` in
        seeded permutations of the speech list laid end to end (a pure function of seed, epoch, index)."""
        cycle, k = divmod(epoch * self.samples_per_epoch + index, len(self.speech))
        if self._order[0] != cycle:  # a spawn key keeps these streams apart from the samples' own
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, cycle], spawn_key=(1,)))
            self._order = (cycle, rng.permutation(len(self.speech)))
        return int(self._order[1][k])

    # --- reading --------------------------------------------------------------------------------

    def _read(self, e: Entry, n: int, u: float, channel: float) -> np.ndarray:
        """``n`` samples at ``cfg.sr`` from ``e`` (fewer if it is shorter), starting at fraction ``u``
        of the free range; raises ``_Bad`` for a file that no longer passes its checks."""
        sr = self.cfg.sr
        try:
            f = sf.SoundFile(e.path)
        except Exception as ex:  # unreadable, vanished
            raise _Bad(BadFile(e.path, e.kind, "unreadable", checks.first_line(ex))) from ex
        with f:
            if f.samplerate != e.sr:
                raise _Bad(BadFile(e.path, e.kind, "wrong_rate", f"{f.samplerate} Hz, list says {e.sr} Hz"))
            if f.frames / f.samplerate < self.check.min_seconds(e.kind):
                raise _Bad(BadFile(e.path, e.kind, "too_short", f"{f.frames / f.samplerate:.3f} s"))
            need = min(f.frames, math.ceil(n * f.samplerate / sr) + 16)
            try:  # from here a failure may depend on the stretch read (a truncated file, NaN in part)
                f.seek(int(u * (f.frames - need)))
                x = f.read(need, dtype="float32", always_2d=True)
            except Exception as ex:
                raise _Bad(BadFile(e.path, e.kind, "unreadable", checks.first_line(ex)), whole=False) from ex
        if x.shape[0] == 0:
            raise _Bad(BadFile(e.path, e.kind, "empty", "no samples"), whole=False)
        x = x[:, min(int(channel * x.shape[1]), x.shape[1] - 1)]  # one channel, as libDF
        if not np.isfinite(x).all():
            raise _Bad(BadFile(e.path, e.kind, "nan", "NaN or inf samples"), whole=False)
        if e.sr != sr:
            x = audio.resample(x, e.sr, sr)
        return x[:n]

    def _slot(self, files: list[Entry], i: int, n: int, rng: np.random.Generator) -> tuple[Entry, np.ndarray]:
        """File ``i`` (or the next usable one) read at a random position; always draws two numbers."""
        u, channel = rng.random(), rng.random()
        for k in range(len(files)):
            e = files[(i + k) % len(files)]
            if e.path in self._bad:
                continue
            try:
                return e, self._read(e, n, u, channel)
            except _Bad as b:
                if b.whole:  # never read again; a stretch's failure is not remembered, so a sample
                    self._bad.add(e.path)  # depends on (seed, epoch, index) only, not on what was read before
                self.report.add(b.bad)
        kind = files[0].kind
        raise NoUsableFiles(f"all {len(files)} {kind} files are unusable: {self.report.summary()}")

    def _rir(self, i: int) -> tuple[Entry, np.ndarray]:
        for k in range(len(self.rirs)):
            e = self.rirs[(i + k) % len(self.rirs)]
            if e.path in self._bad:
                continue
            if e.path not in self._rir_cache:
                try:
                    x = self._read(e, 10 * self.cfg.sr, 0.0, 0.0)
                    bad = checks.content(x, e.path, "rir", self.check)
                    if bad:
                        raise _Bad(bad)
                except _Bad as b:
                    self._bad.add(e.path)
                    self.report.add(b.bad)
                    continue
                self._rir_cache[e.path] = x
            return e, self._rir_cache[e.path]
        raise NoUsableFiles(f"all {len(self.rirs)} RIR files are unusable: {self.report.summary()}")

    # --- mixing ---------------------------------------------------------------------------------

    def sample(self, epoch: int, index: int) -> Mixture:
        """The sample at ``index`` of ``epoch``: a pure function of (seed, epoch, index) and the files."""
        c, sr, n = self.cfg, self.cfg.sr, self.cfg.samples
        rng = np.random.default_rng([self.seed, epoch, index])
        meta: dict = {"index": index, "epoch": epoch}

        e, seg = self._slot(self.speech, self.speech_index(epoch, index), n, rng)
        offset = int(rng.integers(0, n - seg.size + 1))
        span = slice(offset, offset + seg.size)  # where the speech is: its power sets the SNR
        speech = np.zeros(n, np.float32)
        speech[offset : offset + seg.size] = seg
        meta.update(speech=e.path, speaker=e.group, offset=offset, length=seg.size)
        if rng.random() < c.p_eq:
            speech, meta["eq"] = augment.random_eq(speech, sr, rng, c.eq_max_filters, c.eq_gain_db, c.eq_q)
        silent = augment.rms(speech) == 0  # an all-zero speech crop: noise-only, and the sample says why
        noise_only = rng.random() < c.p_noise_only or silent
        if silent:
            meta["silent_speech"] = True

        noise = self._noise(e.group, n, rng, meta)

        wet = speech
        reverb_speech, reverb_noise = rng.random() < c.p_reverb, rng.random() < c.p_reverb
        if self.rirs and (reverb_speech or reverb_noise):
            re_, rir = self._rir(int(rng.integers(len(self.rirs))))
            if reverb_speech:
                wet, speech = augment.reverb(speech, rir, sr, c.early_ms, c.target_rt60)
            if reverb_noise:  # the same room, aligned like the speech
                rir = rir / np.sqrt(np.sum(np.square(rir, dtype=np.float64)))
                noise = augment.convolve_aligned(noise, rir, int(np.argmax(np.abs(rir))))
            meta.update(rir=re_.path, reverb_speech=reverb_speech, reverb_noise=reverb_noise)

        max_freq = e.max_freq
        if rng.random() < c.p_bandlimit:
            cut = [f for f in c.cutoffs_hz if f < min(max_freq, sr // 2)]
            if cut:
                max_freq = int(rng.choice(cut))
                meta["bandlimit_hz"] = max_freq
        if max_freq < sr // 2:  # the noise never has more bandwidth than the speech (as libDF)
            dry_is_wet = wet is speech
            speech, noise = augment.lowpass(speech, sr, max_freq), augment.lowpass(noise, sr, max_freq)
            wet = speech if dry_is_wet else augment.lowpass(wet, sr, max_freq)

        ps, pn = augment.rms(speech[span]) ** 2, augment.rms(noise) ** 2
        snr = float(rng.choice(c.snrs))
        if noise_only or ps == 0:
            k, snr = math.sqrt(max(ps, 10 ** (-50 / 10)) / pn), NOISE_ONLY_SNR
            speech = wet = np.zeros(n, np.float32)
        else:
            k = math.sqrt(ps / (pn * 10 ** (snr / 10)))
        noise = (noise * k).astype(np.float32)
        noisy = wet + noise

        gain = float(rng.choice(c.gains_db))
        g = 10 ** (gain / 20)
        speech, noise, noisy = speech * g, noise * g, noisy * g
        if rng.random() < c.p_clip:
            noisy, meta["clip"] = augment.clip(noisy, float(rng.uniform(*c.clip_range)))
        peak = max(float(np.max(np.abs(a))) for a in (noisy, speech, noise))
        if peak > 1.0:  # scale everything alike so the SNR holds
            speech, noise, noisy = speech / peak, noise / peak, noisy / peak
        meta.update(snr=snr, gain_db=gain, noise_only=bool(noise_only))
        return Mixture(
            noisy.astype(np.float32), speech.astype(np.float32), noise.astype(np.float32), snr, meta
        )

    def _noise(self, speaker: str, n: int, rng: np.random.Generator, meta: dict) -> np.ndarray:
        """The sum of 1-3 noise segments (and maybe another speaker), each at unit RMS times its gain."""
        c = self.cfg
        parts, meta["noises"] = [], []
        for _ in range(int(rng.integers(c.noises[0], c.noises[1] + 1))):
            ne, x = self._slot(self.noise, int(rng.integers(len(self.noise))), n, rng)
            x = self._fill(x, n, rng)
            if rng.random() < c.p_eq:
                x, _ = augment.random_eq(x, c.sr, rng, c.eq_max_filters, c.eq_gain_db, c.eq_q)
            g = float(rng.choice(c.noise_gains_db))
            parts.append(synth.unit_rms(x) * 10 ** (g / 20))
            meta["noises"].append({"path": ne.path, "gain_db": g})
        if rng.random() < c.p_interferer:
            others = [s for s in self.speech if s.group != speaker]
            ie = None
            if others:  # a bad file falls back to the next of the others, never to the target's speaker
                try:
                    ie, x = self._slot(others, int(rng.integers(len(others))), n, rng)
                except NoUsableFiles:  # no other speaker's file is usable: no interferer
                    pass
            if ie is not None:
                g = float(rng.choice(c.noise_gains_db))
                parts.append(synth.unit_rms(self._fill(x, n, rng)) * 10 ** (g / 20))
                meta["interferer"] = {"path": ie.path, "speaker": ie.group, "gain_db": g}
        noise = np.sum(parts, axis=0).astype(np.float32)
        if augment.rms(noise) == 0:  # every segment silent: pink noise instead, so an SNR can be set
            noise = synth.colored_noise(n, 1.0, rng)
            meta["noises"].append({"path": "pink (fallback: silent noise segments)", "gain_db": 0.0})
        return noise

    @staticmethod
    def _fill(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """Loop a short segment to ``n`` samples from a random phase (libDF repeats short noise)."""
        if x.size >= n:
            return x[:n]
        reps = np.tile(x, -(-n // x.size) + 1)
        start = int(rng.integers(0, x.size))
        return reps[start : start + n]


def mixture_steps(
    speech: np.ndarray,
    noise: np.ndarray,
    sr: int,
    snr_db: float = 5.0,
    rt60: float | None = 0.5,
    eq_gain_db: float = 0.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One mixture built step by step, for inspection (notebook 01); signals (samples,) float32.

    Steps: dry speech -> EQ (a 1 kHz peaking biquad of ``eq_gain_db``) -> room (a random shoebox
    of reverberation time ``rt60`` s, or none) -> noise. As in ``Mixer``, the training target keeps the
    direct path and early reflections, and the noise is at ``snr_db`` against that target.
    """
    from dfn4lab.data import mix, rooms

    from scipy import signal as sps

    n = min(speech.size, noise.size)
    speech, noise = speech[:n].astype(np.float32), noise[:n].astype(np.float32)
    eq = augment.match_rms(
        sps.sosfilt(augment.biquad("peaking", 1000.0, sr, 1.0, eq_gain_db)[None], speech), speech
    )
    wet, target = eq, eq
    if rt60:
        room = rooms.random_room(np.random.default_rng(seed), rt60=(rt60, rt60), mics=1)
        rir = rooms.simulate(room, sr)[0][0]
        wet, target = augment.reverb(eq, rir, sr, MixConfig().early_ms, rt60)
    noisy = wet + (mix(target, noise, snr_db) - target)
    return {"speech": speech, "eq": eq, "reverberant": wet, "noisy": noisy, "target": target}
