"""dfn4lab.data.loader: batch layout, agreement with dsp, bit-exact resume (also across worker counts)."""

from __future__ import annotations

import json
from pathlib import Path

from dfn4lab import dsp
from dfn4lab.config import DspConfig
from dfn4lab.data.config import DataConfig
from dfn4lab.data.loader import Batch, DataPosition, Loader
from dfn4lab.data.mixing import Mixer

import mlx.core as mx
import numpy as np
import pytest

MIX = dict(max_len_s=0.5, p_reverb=0.5, p_clip=0.2, p_bandlimit=0.2, p_interferer=0.2)


@pytest.fixture(scope="module")
def mixer(tiny_corpus: Path) -> Mixer:
    cfg = DataConfig.from_json(tiny_corpus / "data_config.json").replace(mix=MIX, samples_per_epoch=12)
    return Mixer.from_config(cfg, "train")


def as_np(batches: list[Batch]) -> list[list[np.ndarray]]:
    return [[np.array(x) for x in b] for b in batches]


def assert_same(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            np.testing.assert_array_equal(u, v)


def test_batch_layout_and_agreement_with_dsp(mixer):
    cfg = DspConfig()
    lo = Loader(mixer, batch_size=4, shuffle=False)
    b = next(iter(lo))
    t = mixer.cfg.samples // cfg.hop_size
    assert b.noisy.shape == b.clean.shape == (4, t, cfg.freq_bins, 2)
    assert b.feat_erb.shape == (4, t, cfg.nb_erb) and b.feat_spec.shape == (4, t, cfg.nb_df, 2)
    assert b.snr.shape == (4,) and all(x.dtype == mx.float32 for x in b)
    # Unshuffled, batch 0 holds samples 0..3 of epoch 0: recompute them independently.
    xs = [mixer.sample(0, i) for i in range(4)]
    spec = dsp.stft(mx.array(np.stack([x.noisy for x in xs])), cfg)
    erb, _ = dsp.features(spec, cfg)
    np.testing.assert_allclose(np.array(b.noisy[..., 0]), np.array(mx.real(spec)), atol=1e-6)
    np.testing.assert_allclose(np.array(b.feat_erb), np.array(erb), atol=1e-5)
    np.testing.assert_array_equal(np.array(b.snr), np.array([x.snr for x in xs], np.float32))
    assert lo.position == DataPosition(0, 1, lo.position.rng)


def test_epochs_are_reshuffled_and_cover_every_sample(mixer):
    lo = Loader(mixer, batch_size=4, seed=3)
    e0 = np.concatenate([np.array(b.snr) for b in lo])
    assert lo.position.epoch == 1 and lo.position.batch == 0
    e1 = np.concatenate([np.array(b.snr) for b in lo])
    assert len(e0) == len(e1) == 12
    snr_by_index = np.array([mixer.sample(0, i).snr for i in range(12)], np.float32)
    assert sorted(e0) == sorted(snr_by_index)  # a permutation of the epoch's samples


def test_resume_is_bit_exact(mixer):
    ref_loader = Loader(mixer, batch_size=4, seed=7)
    reference = as_np(list(ref_loader) + list(ref_loader))  # two whole epochs, 3 batches each

    lo = Loader(mixer, batch_size=4, seed=7)
    first = list(lo)
    it = iter(lo)
    first.append(next(it))  # epoch 1, batch 0, then the run is interrupted
    saved = json.dumps(lo.position.to_dict())  # what a checkpoint stores
    del lo, it

    resumed = Loader(mixer, batch_size=4, seed=0, position=DataPosition.from_dict(json.loads(saved)))
    rest = list(resumed)
    assert_same(as_np(first + rest), reference)
    assert resumed.position.epoch == 2

    # Resuming at an epoch boundary with only (epoch, batch) derives the same order from the seed.
    at_epoch_1 = Loader(mixer, batch_size=4, seed=7, position=DataPosition(epoch=1, batch=0))
    assert_same(as_np(list(at_epoch_1)), reference[3:])


def test_workers_give_the_same_batches_and_resume(mixer):
    reference = as_np(list(Loader(mixer, batch_size=4, seed=5)))
    with Loader(mixer, batch_size=4, workers=2, prefetch=3, seed=5) as lo:
        it = iter(lo)
        got = [next(it)]  # batch 0; the workers are already making batches 1 and 2
        pos = lo.position
    with Loader(mixer, batch_size=4, workers=2, seed=5, position=pos) as lo:
        got += list(lo)
    assert_same(as_np(got), reference)


def test_from_config(tiny_corpus):
    cfg = DataConfig.from_json(tiny_corpus / "data_config.json").replace(batch_size=2, workers=0, seed=4)
    lo = Loader.from_config(cfg, "train")
    assert (lo.batch_size, lo.workers, lo.seed, lo.shuffle) == (2, 0, 4, True)
    assert len(lo) == len(lo.source) // 2 and not Loader.from_config(cfg, "valid").shuffle


def test_too_small_source_is_an_error(mixer):
    with pytest.raises(ValueError, match="fewer than one batch"):
        Loader(mixer, batch_size=100)
    with pytest.raises(ValueError, match="mixed at 48000 Hz but the model's DSP runs at 16000 Hz"):
        Loader(mixer, batch_size=2, dsp_cfg=DspConfig(sr=16000, fft_size=320, hop_size=160))
