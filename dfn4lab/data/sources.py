"""Audio that system packages install, turned into 48 kHz mono clips for the demo corpus.

Each source function returns ``(clips, skipped)``: the clips it could make and, if it made none,
why (package missing, tool absent). Nothing is downloaded. Clips are grouped: a group is one
speaker (speech) or one sound with its variants (noise), the unit the corpus splits by.

| source | kind | Debian package | license (per file from the package's copyright file where given) |
|---|---|---|---|
| alsa-utils | speech | alsa-utils | GPL-2 |
| klettres | speech | klettres-data | GPL-2+ |
| ktuberling | speech | ktuberling-data | GPL-2+ |
| asterisk | speech | asterisk-core-sounds-en-wav | CC-BY-SA-3.0 |
| espeak-ng | speech | espeak-ng | GPL-3+ |
| festival | speech | festival, festvox-us-slt-hts | BSD-3 |
| say | speech | (macOS built-in) | Apple TTS |
| sonic-pi | noise | sonic-pi-samples | CC0, some MIT |
| minetest | noise | minetest-data | CC-BY-SA-3.0, some CC-BY-3.0 or CC0-1.0 |
"""

from __future__ import annotations

import fnmatch
import functools
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dfn4lab import audio

import numpy as np
import soundfile as sf

SR = 48000


@dataclass
class Clip:
    """One corpus file before it is written: 48 kHz mono float32 audio and where it came from."""

    source: str
    kind: str  # speech | noise
    group: str  # speaker, or a sound and its variants
    name: str
    audio: np.ndarray  # (samples,) at 48 kHz
    source_sr: int
    license: str
    origin: list[str] = field(default_factory=list)  # input files or the command that made it

    @property
    def max_freq(self) -> int:
        return min(self.source_sr, SR) // 2


Result = tuple[list[Clip], str | None]


# --- Signal preparation ------------------------------------------------------------------------


def prepare(x: np.ndarray, sr: int, trim_db: float | None = -45.0) -> np.ndarray:
    """``(channels, samples)`` at ``sr`` -> 48 kHz mono, DC removed, edge silence trimmed to 50 ms."""
    x = x.mean(axis=0) if x.ndim == 2 else x
    x = audio.resample(x - x.mean(), sr, SR)
    if trim_db is not None:
        x = trim(x, trim_db)
    return x


def trim(x: np.ndarray, below_db: float = -45.0, margin_s: float = 0.05) -> np.ndarray:
    """Cut leading/trailing 10 ms frames quieter than ``below_db`` under the loudest frame."""
    hop = SR // 100
    n = x.size // hop
    if n == 0:
        return x
    e = np.mean(x[: n * hop].reshape(n, hop).astype(np.float64) ** 2, axis=1)
    active = np.nonzero(e > e.max() * 10 ** (below_db / 10))[0]
    if active.size == 0:
        return x[:0]
    m = int(margin_s * SR)
    return x[max(0, active[0] * hop - m) : min(x.size, (active[-1] + 1) * hop + m)]


def level(x: np.ndarray, rms_db: float = -25.0, peak: float = 0.89) -> np.ndarray:
    """Scale to ``rms_db`` dBFS RMS, less if the peak would pass ``peak`` (16-bit files keep detail)."""
    rms = np.sqrt(np.mean(np.square(x, dtype=np.float64)))
    if rms == 0:
        return x.astype(np.float32)
    g = min(10 ** (rms_db / 20) / rms, peak / float(np.max(np.abs(x))))
    return (x * g).astype(np.float32)


def fade(x: np.ndarray, seconds: float = 0.005) -> np.ndarray:
    n = min(int(seconds * SR), x.size // 2)
    if n == 0:
        return x
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
    x = x.copy()
    x[:n] *= ramp
    x[-n:] *= ramp[::-1]
    return x


def assemble(
    pieces: Sequence[np.ndarray], seconds: float, count: int, rng: np.random.Generator, gap_s: float = 0.0
) -> list[tuple[np.ndarray, list[int]]]:
    """Up to ``count`` concatenations of about ``seconds`` from shuffled ``pieces`` (each used once
    while they last), with up to ``gap_s`` of silence between pieces. Returns (audio, piece indices)."""
    order = list(rng.permutation(len(pieces)))
    out = []
    while order and len(out) < count:
        idx: list[int] = []
        parts: list[np.ndarray] = []
        while order and sum(p.size for p in parts) < seconds * SR:
            i = int(order.pop())
            idx.append(i)
            parts.append(fade(pieces[i]))
            if gap_s > 0:
                parts.append(np.zeros(int(rng.uniform(0, gap_s) * SR), np.float32))
        out.append((np.concatenate(parts), idx))
    return out


# --- Licenses ------------------------------------------------------------------------------------


@functools.cache
def _dep5(copyright_file: str) -> list[tuple[list[str], str]]:
    """(patterns, license) stanzas of a machine-readable Debian copyright file, in file order."""
    stanzas, pats, lic, in_files = [], [], None, False
    for line in Path(copyright_file).read_text(errors="replace").splitlines() + [""]:
        if not line.strip():
            if pats and lic:
                stanzas.append((pats, lic))
            pats, lic, in_files = [], None, False
        elif line.startswith("Files:"):
            pats, in_files = line[6:].split(), True
        elif line.startswith("License:"):
            lic, in_files = line[8:].strip(), False
        elif in_files and line[:1].isspace():
            pats += line.split()
        elif not line[:1].isspace():
            in_files = False
    return stanzas


def license_of(path: str | Path, package: str, default: str, doc: Path = Path("/usr/share/doc")) -> str:
    """The license ``doc/package/copyright`` gives ``path`` (DEP-5: the last matching stanza wins).

    Patterns name paths in the source tree; they are matched against the installed path's tails of
    at least as many components, also without their first component when two remain
    (``etc/samples/x.flac`` matches ``.../samples/x.flac``; ``debian/*`` does not become ``*``). As in
    DEP-5, ``*`` spans folders: ``mtg/mods/carts/*`` covers ``.../mods/carts/sounds/x.ogg``.
    """
    cfile = doc / package / "copyright"
    if not cfile.is_file():
        return default
    parts = Path(path).parts
    tails = ["/".join(parts[k:]) for k in range(len(parts))]  # longest first
    found = default
    for pats, lic in _dep5(str(cfile)):
        for pat in pats:
            pp = pat.split("/")
            for cand in (pp, pp[1:]) if len(pp) > 2 else (pp,):
                if any(fnmatch.fnmatchcase(t, "/".join(cand)) for t in tails[: len(parts) - len(cand) + 1]):
                    found = lic
    return found


# --- Recorded speech -----------------------------------------------------------------------------


def _recorded(
    source: str,
    package: str,
    default_license: str,
    groups: dict[str, list[Path]],
    rng: np.random.Generator,
    utts: int,
    seconds: float,
) -> list[Clip]:
    """Speech clips from recorded pieces: per group, pieces trimmed and joined into utterances."""
    clips = []
    for group in sorted(groups):
        candidates = sorted(groups[group])
        files, pieces, srs = [], [], []
        for i in rng.permutation(len(candidates)):  # in random order, only as many as needed
            f = candidates[int(i)]
            try:
                x, sr = audio.load(f)
            except audio.AudioError:
                continue  # a broken system file: leave it out of the corpus
            files.append(f)
            pieces.append(prepare(x, sr))
            srs.append(sr)
            if sum(p.size for p in pieces) > 1.2 * utts * seconds * SR:
                break
        keep = [i for i, p in enumerate(pieces) if p.size > 0.1 * SR]
        if not keep:
            continue
        made = assemble([pieces[i] for i in keep], seconds, utts, rng)
        for k, (x, idx) in enumerate(made):
            used = [files[keep[i]] for i in idx]
            lic = sorted({license_of(p, package, default_license) for p in used})
            sr = min(srs[keep[i]] for i in idx)
            origin = [str(p) for p in used]
            clips.append(
                Clip(
                    source,
                    "speech",
                    f"{source}/{group}",
                    f"{group}-{k:02d}",
                    level(x),
                    sr,
                    " AND ".join(lic),
                    origin,
                )
            )
    return clips


def alsa_utils(rng: np.random.Generator, utts: int = 3, seconds: float = 3.5) -> Result:
    """alsa-utils' channel prompts ("Front left", ...): one male speaker, 48 kHz."""
    d = Path("/usr/share/sounds/alsa")
    files = sorted(p for p in d.glob("*.wav") if p.stem != "Noise")
    if not files:
        return [], f"{d} has no prompts (Debian package alsa-utils)"
    return _recorded("alsa-utils", "alsa-utils", "GPL-2", {"male": files}, rng, utts, seconds), None


def klettres(rng: np.random.Generator, utts: int = 2, seconds: float = 4.0) -> Result:
    """KLettres letters and syllables: one group per language, 44.1 kHz."""
    d = Path("/usr/share/klettres")
    groups: dict[str, list[Path]] = defaultdict(list)
    for p in d.glob("*/*/*.ogg"):
        groups[p.parts[-3]].append(p)
    if not groups:
        return [], f"{d} is missing (Debian package klettres-data)"
    return _recorded("klettres", "klettres-data", "GPL-2+", groups, rng, utts, seconds), None


def ktuberling(rng: np.random.Generator, utts: int = 2, seconds: float = 4.0) -> Result:
    """KTuberling's spoken words: one group per language (Serbian scripts are one speaker)."""
    d = Path("/usr/share/ktuberling/sounds")
    groups: dict[str, list[Path]] = defaultdict(list)
    for p in d.glob("*/*.ogg"):
        groups[p.parent.name.split("@")[0]].append(p)
    if not groups:
        return [], f"{d} is missing (Debian package ktuberling-data)"
    return _recorded("ktuberling", "ktuberling-data", "GPL-2+", groups, rng, utts, seconds), None


def asterisk(rng: np.random.Generator, utts: int = 12, seconds: float = 4.0) -> Result:
    """Asterisk's studio prompts: one female speaker (Allison), 8 kHz so band-limited to 4 kHz."""
    d = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
    files = sorted(p for p in d.glob("*.wav") if not re.search(r"tone|beep", p.stem))
    if not files:
        return [], f"{d} is missing (Debian package asterisk-core-sounds-en-wav)"
    take = [files[int(i)] for i in rng.permutation(len(files))[: utts * 3]]  # ~3 prompts per utterance
    clips = _recorded(
        "asterisk", "asterisk-core-sounds-en-wav", "CC-BY-SA-3.0", {"allison": take}, rng, utts, seconds
    )
    return clips, None


# --- Synthesised speech --------------------------------------------------------------------------

SENTENCES = (
    "The morning train was late again, so we walked along the river instead.",
    "Please put the blue folder on the second shelf next to the window.",
    "She said the meeting would start at nine, but nobody was there on time.",
    "A small boat drifted slowly past the harbour lights in the fog.",
    "If you turn left at the bakery, the library is right in front of you.",
    "We need three more chairs and a longer table for the dinner on Friday.",
    "The old radio in the kitchen still plays every station perfectly.",
    "He forgot his umbrella, and the rain started just as he left the office.",
    "Could you send me the report before lunch, or is that too early?",
    "The children built a tall tower of wooden blocks in the middle of the room.",
    "Fresh bread and warm soup are the best things on a cold winter evening.",
    "Our neighbours painted their front door bright yellow last weekend.",
    "The museum opens at ten and closes early on public holidays.",
    "I think the printer on the third floor is out of paper again.",
    "A strong wind blew the leaves across the empty parking lot.",
    "They moved to a quiet village near the mountains two years ago.",
    "Remember to water the plants while we are away on holiday.",
    "The new bridge will make the trip to the city much shorter.",
    "My sister plays the violin in a small orchestra every Sunday.",
    "The shop on the corner sells newspapers, coffee and postcards.",
    "When the lights went out, we lit candles and told stories.",
    "The engineer checked every cable before switching the system on.",
    "Please speak a little louder, the connection is not very good.",
    "Seven ducks crossed the road while the traffic waited patiently.",
    "This recipe needs two eggs, a cup of flour and a pinch of salt.",
    "The football match was cancelled because the field was flooded.",
    "He reads the news on his phone every morning on the bus.",
    "Our flight leaves at half past six, so we should get up early.",
    "The garden looks wonderful now that the roses are in bloom.",
    "Turn the volume down a bit, the baby is finally asleep.",
    "The teacher wrote the answers on the board in large letters.",
    "A cat was sleeping in the sun on top of the garden wall.",
    "We watched the storm roll in from the balcony of the hotel.",
    "The price of the tickets includes a guided tour of the castle.",
    "Could you tell me where the nearest pharmacy is, please?",
    "The kettle is boiling, would anyone like a cup of tea?",
    "After the concert, the streets were full of happy people.",
    "The doctor said I should rest for a few days and drink water.",
    "Every evening the lighthouse sends its beam across the bay.",
    "The list of names was longer than anyone had expected.",
)

ESPEAK_VOICES = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
)
ESPEAK_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3",
    "klatt4", "Andy", "Annie", "edward", "john", "linda", "max", "steph", "norbert",
)  # fmt: skip


def _run_tts(jobs: list[tuple[list[str], str | None, Path]]) -> list[Path | None]:
    """Run (command, stdin text, output wav) jobs in parallel; None for any that failed (non-zero exit,
    hung, or no readable audio written)."""

    def one(job: tuple[list[str], str | None, Path]) -> Path | None:
        cmd, stdin, out = job
        try:
            r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
        except (subprocess.TimeoutExpired, OSError):  # a hung or missing synthesizer: this clip only
            return None
        if r.returncode != 0 or not out.is_file():
            return None
        try:
            return out if sf.info(str(out)).frames > 0 else None
        except RuntimeError:  # exited 0 but wrote no audio
            return None

    with ThreadPoolExecutor(4) as ex:
        return list(ex.map(one, jobs))


def _synth_clips(
    source: str,
    license_: str,
    speakers: list[tuple[str, list[str]]],
    texts: list[list[str]],
    stdin: bool,
) -> list[Clip]:
    """Clips from TTS: ``speakers`` are (group, command); the text is the last argument or stdin."""
    flag = "-o" if stdin else "-w"
    with tempfile.TemporaryDirectory() as tmp:
        jobs, meta = [], []
        for (group, cmd), sents in zip(speakers, texts, strict=True):
            for k, s in enumerate(sents):
                out = Path(tmp) / f"{len(jobs)}.wav"
                jobs.append(([*cmd, flag, str(out)] + ([] if stdin else [s]), s if stdin else None, out))
                meta.append((group, k, " ".join([Path(cmd[0]).name, *cmd[1:]]) + f' "{s}"'))
        clips = []
        for out, (group, k, what) in zip(_run_tts(jobs), meta, strict=True):
            if out is None:
                continue
            x, sr = sf.read(out, dtype="float32", always_2d=True)
            y = prepare(x.T, sr)
            if y.size > 0.5 * SR:
                name = f"{group}-{k:02d}"
                clips.append(
                    Clip(source, "speech", f"{source}/{group}", name, level(y), sr, license_, [what])
                )
    return clips


def espeak(rng: np.random.Generator, speakers: int = 24, utts: int = 4) -> Result:
    """espeak-ng: each speaker is a variant (timbre) with a random accent, pitch and rate; 22.05 kHz."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return [], "espeak-ng not found (Debian: espeak-ng; macOS: brew install espeak-ng)"
    listing = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True).stdout
    have = {ln.split()[-1].split("/")[-1] for ln in listing.splitlines()[1:] if ln.strip()}
    variants = [v for v in ESPEAK_VARIANTS if v in have] or [""]
    voices = subprocess.run([exe, "--voices=en"], capture_output=True, text=True).stdout
    bases = [v for v in ESPEAK_VOICES if f" {v} " in voices] or ["en"]
    spk, texts = [], []
    for i in rng.permutation(len(variants))[:speakers]:  # a variant (the timbre) is used once only
        var, base = variants[int(i)], bases[int(rng.integers(len(bases)))]
        pitch, rate = int(rng.integers(25, 75)), int(rng.integers(140, 190))
        voice = f"{base}+{var}" if var else base
        spk.append((var or base, [exe, "-v", voice, "-p", str(pitch), "-s", str(rate)]))
        texts.append([SENTENCES[int(i)] for i in rng.permutation(len(SENTENCES))[:utts]])
    clips = _synth_clips("espeak-ng", "GPL-3+", spk, texts, stdin=False)
    return clips, None if clips else "espeak-ng produced no audio"


def festival(rng: np.random.Generator, utts: int = 10) -> Result:
    """Festival with the CMU US SLT HTS voice (one female speaker), 32 kHz."""
    exe = shutil.which("text2wave")
    voice = Path("/usr/share/festival/voices/us/cmu_us_slt_arctic_hts")
    if exe is None or not voice.is_dir():
        return (
            [],
            "festival with festvox-us-slt-hts not installed (Debian packages festival, festvox-us-slt-hts)",
        )
    texts = [[SENTENCES[int(i)] for i in rng.permutation(len(SENTENCES))[:utts]]]
    spk = [("slt", [exe, "-eval", "(voice_cmu_us_slt_arctic_hts)"])]
    clips = _synth_clips("festival", "BSD-3-clause", spk, texts, stdin=True)
    return clips, None if clips else "festival produced no audio"


def say(rng: np.random.Generator, speakers: int = 8, utts: int = 4) -> Result:
    """macOS ``say`` with its English voices (the speech source of a Mac without espeak-ng)."""
    exe = shutil.which("say")
    if exe is None:
        return [], "say not found (macOS only)"
    listing = subprocess.run([exe, "-v", "?"], capture_output=True, text=True).stdout
    names = sorted({m.group(1) for m in re.finditer(r"^(\S+)\s+en[_-]", listing, re.M)})
    if not names:
        return [], "say lists no English voices"
    chosen = [names[int(i)] for i in rng.permutation(len(names))[:speakers]]
    spk = [(v, [exe, "-v", v, "--file-format=WAVE", "--data-format=LEI16@22050"]) for v in chosen]
    texts = [[SENTENCES[int(i)] for i in rng.permutation(len(SENTENCES))[:utts]] for _ in chosen]
    clips = _synth_clips("say", "Apple macOS TTS output", spk, texts, stdin=True)
    return clips, None if clips else "say produced no audio"


def speechlike(rng: np.random.Generator, speakers: int = 6, utts: int = 3, seconds: float = 3.0) -> Result:
    """Procedural voice-like signals (``synth.speechlike``): the fallback when no speech is installed."""
    from dfn4lab.data import synth

    clips = []
    for s in range(speakers):
        f0, scale = float(rng.uniform(90, 240)), float(rng.uniform(0.85, 1.25))
        for k in range(utts):
            x = synth.speechlike(seconds, SR, rng, f0, scale)
            what = f"dfn4lab.data.synth.speechlike(f0={f0:.1f}, formant_scale={scale:.3f})"
            clips.append(
                Clip(
                    "speechlike",
                    "speech",
                    f"speechlike/spk{s}",
                    f"spk{s}-{k:02d}",
                    level(x),
                    SR,
                    "CC0-1.0",
                    [what],
                )
            )
    return clips, None


# --- Recorded noise ------------------------------------------------------------------------------

SONIC_PI_NOISES = (
    "ambi_dark_woosh", "ambi_drone", "ambi_glass_hum", "ambi_glass_rub", "ambi_haunted_hum",
    "ambi_lunar_land", "ambi_sauna", "ambi_soft_buzz", "ambi_swoosh", "loop_3d_printer", "loop_industrial",
    "loop_electric", "mehackit_phone1", "mehackit_phone2", "mehackit_phone3", "mehackit_phone4", "misc_crow",
    "misc_cineboom", "perc_door", "vinyl_hiss", "vinyl_rewind", "vinyl_backspin", "vinyl_scratch",
    "elec_beep",
)  # fmt: skip


def _noise_groups(
    source: str,
    package: str,
    default_license: str,
    groups: dict[str, list[Path]],
    rng: np.random.Generator,
    seconds: float,
    max_seconds: float,
) -> list[Clip]:
    """One noise clip per group: its variants in random order with short pauses, looped to ``seconds``."""
    clips = []
    for group in sorted(groups):
        files = sorted(groups[group])
        pieces, srs, used = [], [], []
        for f in files:
            try:
                x, sr = audio.load(f)
            except audio.AudioError:
                continue
            p = prepare(x, sr, trim_db=-60.0)
            if p.size > 0.02 * SR:
                pieces.append(p)
                srs.append(sr)
                used.append(f)
        if not pieces:
            continue
        total = sum(p.size for p in pieces)
        reps = max(1, int(np.ceil(seconds * SR / total)))
        (x, _), *_ = assemble(pieces * reps, seconds, 1, rng, gap_s=0.3)
        lic = sorted({license_of(p, package, default_license) for p in used})
        x = level(x[: int(max_seconds * SR)])
        clips.append(
            Clip(
                source,
                "noise",
                f"{source}/{group}",
                group,
                x,
                min(srs),
                " AND ".join(lic),
                [str(p) for p in used],
            )
        )
    return clips


def sonic_pi(rng: np.random.Generator, seconds: float = 4.0, max_seconds: float = 8.0) -> Result:
    """Sonic Pi's ambiences, hiss, machines, phones and doors (its music samples are left out)."""
    d = Path("/usr/share/sonic-pi/samples")
    groups: dict[str, list[Path]] = defaultdict(list)
    for name in SONIC_PI_NOISES:
        p = d / f"{name}.flac"
        if p.is_file():
            groups[re.sub(r"\d+$", "", name)].append(p)
    if not groups:
        return [], f"{d} is missing (Debian package sonic-pi-samples)"
    return _noise_groups("sonic-pi", "sonic-pi-samples", "CC0", groups, rng, seconds, max_seconds), None


def minetest(rng: np.random.Generator, seconds: float = 3.0, max_seconds: float = 6.0) -> Result:
    """Minetest's game sounds: water, lava, fire, footsteps, doors, carts, glass, digging."""
    d = Path("/usr/share/games/minetest/games")
    groups: dict[str, list[Path]] = defaultdict(list)
    for p in d.glob("minetest_game/mods/*/sounds/*.ogg"):
        groups[re.sub(r"\.\d+$", "", p.stem)].append(p)
    if not groups:
        return [], f"{d} is missing (Debian package minetest-data)"
    return _noise_groups("minetest", "minetest-data", "CC-BY-SA-3.0", groups, rng, seconds, max_seconds), None


SPEECH_SOURCES: dict[str, Callable[..., Result]] = {
    "alsa-utils": alsa_utils,
    "klettres": klettres,
    "ktuberling": ktuberling,
    "asterisk": asterisk,
    "espeak-ng": espeak,
    "festival": festival,
    "say": say,
}
NOISE_SOURCES: dict[str, Callable[..., Result]] = {"sonic-pi": sonic_pi, "minetest": minetest}
