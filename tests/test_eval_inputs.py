"""Issue 14: inputs the harness used to score wrongly or lose work on, each as a user ran it.

Grouped by mechanism: one input contract for images (``fewstep.io.images_to_uint8``, ``read_image``),
one identity per weights file, one validation path for options (flags and ``--config`` alike, and
``Sampler.for_nfe`` keeping the real error), checks on a sampler's input and its model's output,
sweeps that write as they go, and ``fewstep fid``'s errors: one line, exit status 2, no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep import cli
from fewstep.eval import sweep as sweep_module
from fewstep.eval.features import FeatureExtractor
from fewstep.eval.harness import FolderSource, TensorSource
from fewstep.eval.stats import format_fd
from fewstep.eval.sweep import SweepConfig, run_sweep
from fewstep.io import images_to_uint8
from fewstep.samplers.denoisers import Prediction
from fewstep.samplers.sampler import NFEUnreachable, NonFiniteModelOutput, Sampler
from fewstep.teachers import FMNIST_FD_REFERENCE

pytestmark = pytest.mark.usefixtures("one_thread")


def images(n: int, seed: int, size: int = 8, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def fid(*args) -> int:
    return cli.main(["fid", "--extractor", "fewstep-tiny", *map(str, args)])


def fd_of(capsys) -> float:
    return json.loads(capsys.readouterr().out)["fd"]


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fewstep")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def save_pngs(folder: Path, pictures: torch.Tensor, bits: int = 8) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(pictures):
        if bits == 16:  # grayscale, k -> k * 257 (65535 / 255): the same picture at 16 bits
            Image.fromarray(img[0].numpy().astype(np.uint16) * 257).save(folder / f"{i:03d}.png")
        elif img.shape[0] == 1:
            Image.fromarray(img[0].numpy()).save(folder / f"{i:03d}.png")
        else:
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder


# ---------------------------------------------------------------------------------------------
# One input contract for images: uint8, or floats with a declared range that they fit


def test_a_float_tensor_scores_as_its_uint8_once_its_range_is_declared_and_is_refused_without(tmp_path, capsys):
    u8, ref = images(40, 0), images(40, 1)
    torch.save(u8, tmp_path / "u8.pt")
    torch.save(u8.float() / 255, tmp_path / "totensor.pt")  # what torchvision's ToTensor gives
    torch.save(u8.float() / 127.5 - 1, tmp_path / "pm1.pt")
    torch.save(ref, tmp_path / "ref.pt")
    common = ["--ref", tmp_path / "ref.pt", "--cache-dir", tmp_path / "cache", "--json"]
    assert fid("--gen", tmp_path / "u8.pt", *common) == 0
    expected = fd_of(capsys)
    assert fid("--gen", tmp_path / "totensor.pt", "--range", "0,1", *common) == 0
    assert fd_of(capsys) == pytest.approx(expected, rel=1e-12)
    assert fid("--gen", tmp_path / "pm1.pt", "--range", "-1,1", *common) == 0  # `--range -1,1` as typed
    assert fd_of(capsys) == pytest.approx(expected, rel=1e-12)
    # ambiguous: no declared range -> refused, saying how to convert
    assert fid("--gen", tmp_path / "totensor.pt", *common) == 2
    one_line_error(capsys, "no declared range", "--range", "to_uint8")
    # declared, but the values do not fit it
    assert fid("--gen", tmp_path / "pm1.pt", "--range", "0,1", *common) == 2
    one_line_error(capsys, "outside the declared range [0, 1]")
    with pytest.raises(SystemExit) as info:
        fid("--gen", tmp_path / "u8.pt", "--range", "0,255", *common)
    assert info.value.code == 2 and "range must be -1,1 or 0,1" in capsys.readouterr().err


def test_other_dtypes_and_non_finite_floats_are_refused_with_how_to_convert():
    with pytest.raises(ValueError, match="int64; expected uint8.*16-bit data"):
        TensorSource(torch.zeros(2, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN or inf"):
        images_to_uint8(torch.full((2, 3, 4, 4), float("nan")), (-1, 1))
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(images_to_uint8((x * 255).round() / 255, (0, 1)), (x * 255).round().to(torch.uint8))


def test_16_bit_pngs_are_scaled_to_8_bits_not_saturated(tmp_path, capsys):
    gray = images(24, 2, channels=1)
    eight = FolderSource(save_pngs(tmp_path / "8bit", gray))
    sixteen = FolderSource(save_pngs(tmp_path / "16bit", gray, bits=16))
    assert torch.equal(torch.cat(list(sixteen)), torch.cat(list(eight)))
    torch.save(images(24, 3), tmp_path / "ref.pt")
    common = ["--ref", tmp_path / "ref.pt", "--cache-dir", tmp_path / "cache", "--json"]
    assert fid("--gen", tmp_path / "8bit", *common) == 0
    expected = fd_of(capsys)
    assert fid("--gen", tmp_path / "16bit", *common) == 0
    assert fd_of(capsys) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("odd", [2, 4, 5])  # inside the second batch, at its start (a batch boundary), after
def test_every_image_of_a_folder_has_the_first_ones_size(tmp_path, capsys, odd):
    pictures = [images(1, i, size=9 if i == odd else 8)[0] for i in range(8)]
    folder = tmp_path / "mixed"
    for i, img in enumerate(pictures):
        save_pngs(folder / "tmp", img[None])
        (folder / "tmp" / "000.png").rename(folder / f"{i:03d}.png")
    torch.save(images(16, 1), tmp_path / "ref.pt")
    assert fid("--gen", folder, "--ref", tmp_path / "ref.pt", "--batch-size", "4",
               "--cache-dir", tmp_path / "cache") == 2
    one_line_error(capsys, "differ in size", f"{odd:03d}.png is (9, 9)", "000.png is (8, 8)")


# ---------------------------------------------------------------------------------------------
# One identity for one weights file


def test_the_default_classifier_weights_have_the_identity_stored_in_the_committed_reference(tmp_path, capsys):
    default = FeatureExtractor("fmnist-classifier").protocol.weights
    named = FeatureExtractor("fmnist-classifier", weights=str(FMNIST_FD_REFERENCE.parent / "classifier.pt"))
    stored = json.loads(str(np.load(FMNIST_FD_REFERENCE)["protocol"]))["weights"]
    assert default == named.protocol.weights == stored
    # the README's offline path
    torch.save(images(20, 0, size=28, channels=1), tmp_path / "gen.pt")
    assert cli.main(["fid", "--gen", str(tmp_path / "gen.pt"), "--ref", str(FMNIST_FD_REFERENCE),
                     "--extractor", "fmnist-classifier"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("FD ") and "N=0" not in out and "reference N unknown" in out


# ---------------------------------------------------------------------------------------------
# One validation path for options


@pytest.fixture(scope="module")
def testbed():
    denoiser, shape, _ = sweep_module._testbed(image_size=4, components=2)
    return denoiser, shape


@pytest.mark.parametrize("name, options, message", [
    ("no_such", {}, "unknown sampler 'no_such'"),
    ("ddim", {"etta": 0.5}, "bad option for sampler 'ddim'"),
    ("ddim", {"eta": -1.0}, "eta must be >= 0"),
    ("ddim", {"timesteps": "karas"}, "karas"),
])
def test_for_nfe_keeps_the_real_error(testbed, name, options, message):
    with pytest.raises(ValueError, match=message) as info:
        Sampler.for_nfe(testbed[0], name, 4, **options)
    assert "model calls" not in str(info.value) and not isinstance(info.value, NFEUnreachable)
    with pytest.raises(NFEUnreachable, match="exactly 2 model calls"):
        Sampler.for_nfe(testbed[0], "heun", 2)


def small_sweep(tmp_path, **changes) -> SweepConfig:
    opts = dict(samplers=["ddim", "euler"], nfe=[1, 2], n=16, batch_size=16, n_reference=32, grid_images=0,
                model={"kind": "testbed", "image_size": 4, "components": 2}, extractor="fewstep-tiny",
                out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    opts.update(changes)
    return SweepConfig(**opts)


def test_a_sweep_of_bad_options_fails_and_leaves_an_earlier_table_alone(tmp_path, capsys):
    cfg = small_sweep(tmp_path)
    run_sweep(cfg, log=lambda m: None, out=cfg.out)
    before = (tmp_path / "out" / "results.csv").read_text()
    with pytest.raises(ValueError, match="karas"):  # the library path
        run_sweep(small_sweep(tmp_path, timesteps="karas"), log=lambda m: None, out=cfg.out)
    with pytest.raises(SystemExit) as info:  # the command line: a usage error before anything runs
        cli.main(["sweep", "--timesteps", "karas", "--out", cfg.out])
    assert info.value.code == 2 and "karas" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no cell of the sweep could be computed"):  # heun cannot spend 2
        run_sweep(small_sweep(tmp_path, samplers=["heun"], nfe=[2], out=str(tmp_path / "other")), log=lambda m: None,
                  out=tmp_path / "other")
    assert not (tmp_path / "other" / "results.csv").exists()
    assert (tmp_path / "out" / "results.csv").read_text() == before


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, message", [
    ("dim: 0\n", "dim: dim must be >= 1, got 0"),
    ("seed: abc\n", "seed: invalid int value: 'abc'"),
    ("nfe: [2, x]\n", "nfe: NFE must be an integer, got 'x'"),
    ("samplers: [ddim, nope]\n", "unknown sampler(s) 'nope'"),
])
def test_demo_config_values_are_checked_like_flags(tmp_path, capsys, text, message):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--config", write_config(tmp_path, "testbed: true\n" + text)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "Traceback" not in err


def test_one_sampler_as_a_string_and_registry_aliases_are_accepted(tmp_path, capsys):
    config = write_config(tmp_path, "testbed: true\nsamplers: ddim\nnfe: 2\nn_samples: 20\n")
    assert cli.main(["demo", "--config", config]) == 0
    assert "| ddim " in capsys.readouterr().out
    assert cli.main(["demo", "--testbed", "--samplers", "euler_ancestral", "--nfe", "2", "--n-samples", "20"]) == 0
    assert "| ddpm" in capsys.readouterr().out
    cfg = small_sweep(tmp_path, samplers=["dpmpp_2m_sde"], nfe=[2])
    runs, _ = run_sweep(cfg, log=lambda m: None)
    assert [r.sampler for r in runs] == ["sde_dpmpp_2m"] and runs[0].score is not None


# ---------------------------------------------------------------------------------------------
# A sampler's input and its model's output


def test_integer_or_non_finite_initial_noise_is_refused(testbed):
    sampler = Sampler(testbed[0], "ddim", steps=2)
    with pytest.raises(ValueError, match="floating-point tensor, got torch.int64"):
        sampler.sample(torch.zeros(2, 48, dtype=torch.int64))
    bad = torch.randn(2, 48)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="x_T contains NaN or inf"):
        sampler.sample(bad)


class BreaksAtCall:
    """The testbed denoiser, returning NaN from model call ``k`` (1-based) on."""

    def __init__(self, inner, k):
        self.inner, self.k, self.calls, self.schedule = inner, k, 0, inner.schedule

    def __call__(self, x, t):
        self.calls += 1
        pred = self.inner(x, t)
        if self.calls >= self.k:
            return Prediction(x0=pred.x0 * float("nan"), eps=pred.eps * float("nan"))
        return pred


def test_a_model_returning_nan_is_named_with_its_call(testbed):
    sampler = Sampler(BreaksAtCall(testbed[0], 3), "dpmpp_2m", steps=4)
    with pytest.warns(NonFiniteModelOutput, match="NaN or inf at model call 3 of 4"):
        sampler.sample(torch.randn(2, 48))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy model: no warning
        Sampler(testbed[0], "dpmpp_2m", steps=4).sample(torch.randn(2, 48))


# ---------------------------------------------------------------------------------------------
# Sweeps write as they go and resume


def test_an_interrupted_sweep_keeps_its_finished_cells_and_resumes_from_them(tmp_path, monkeypatch):
    cfg = small_sweep(tmp_path)
    full, _ = run_sweep(small_sweep(tmp_path, out=str(tmp_path / "full")), log=lambda m: None,
                        out=tmp_path / "full")
    real, calls = sweep_module.compute_stats, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "compute_stats", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, log=lambda m: None, out=cfg.out)
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["sampler"], r["nfe"]) for r in doc["runs"]] == [("ddim", 1), ("ddim", 2)]
    calls.clear()
    monkeypatch.setattr(sweep_module, "compute_stats", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed, _ = run_sweep(cfg, log=lambda m: None, out=cfg.out)
    assert len(calls) == 2  # only the two cells not yet in the folder
    assert [(r.sampler, r.nfe, r.score.fd) for r in resumed] == [(r.sampler, r.nfe, r.score.fd) for r in full]
    calls.clear()
    run_sweep(cfg, log=lambda m: None, out=cfg.out)
    assert calls == []  # all done: nothing recomputed
    with pytest.raises(ValueError, match="another protocol .*n: 16 != 24"):
        run_sweep(small_sweep(tmp_path, n=24), log=lambda m: None, out=cfg.out)


def test_an_unwritable_output_folder_fails_before_the_first_cell(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(sweep_module, "compute_stats", lambda *a, **k: pytest.fail("a cell was computed"))
    with pytest.raises(ValueError, match="output folder .* is not writable"):
        run_sweep(small_sweep(tmp_path), log=lambda m: None, out=tmp_path / "file" / "out")
    assert cli.main(["sweep", "--extractor", "fewstep-tiny", "--out", str(tmp_path / "file" / "out")]) == 2
    one_line_error(capsys, "not writable")


def test_the_sweep_csv_names_extractor_and_reference_and_the_log_no_reference_n_0(tmp_path):
    cfg = small_sweep(tmp_path, samplers=["ddim"], nfe=[2])
    lines = []
    run_sweep(cfg, log=lines.append, out=cfg.out)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert rows[0]["extractor"] == "fewstep-tiny" and rows[0]["reference"].startswith("testbed-data:")
    assert rows[0]["weights"].startswith("sha256:") and rows[0]["layer"] == "16"
    assert "N=32" in lines[0] and "N=0" not in lines[0]


# ---------------------------------------------------------------------------------------------
# fewstep fid: one line, exit 2, no traceback


@pytest.fixture
def ref_pt(tmp_path):
    torch.save(images(20, 1), tmp_path / "ref.pt")
    return tmp_path / "ref.pt"


def test_missing_paths_corrupt_images_and_non_statistics_are_one_line_each(tmp_path, ref_pt, capsys):
    cache = ["--cache-dir", tmp_path / "cache"]
    assert fid("--gen", tmp_path / "nowhere", "--ref", ref_pt, *cache) == 2
    one_line_error(capsys, "no such file or folder", "nowhere")
    folder = save_pngs(tmp_path / "pngs", images(6, 0))
    data = (folder / "003.png").read_bytes()
    (folder / "003.png").write_bytes(data[: len(data) // 2])  # truncated
    assert fid("--gen", folder, "--ref", ref_pt, *cache) == 2
    one_line_error(capsys, "003.png")
    (folder / "003.png").write_bytes(b"not a png at all")
    assert fid("--gen", folder, "--ref", ref_pt, *cache) == 2
    one_line_error(capsys, "003.png")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    (tmp_path / "text.npz").write_text("hello")
    for bad in ("other.npz", "text.npz"):
        assert fid("--gen", tmp_path / bad, "--ref", ref_pt, *cache) == 2
        one_line_error(capsys, bad, "is not FD statistics")
    (tmp_path / "torn.pt").write_bytes(b"\x80\x02garbage")
    assert fid("--gen", tmp_path / "torn.pt", "--ref", ref_pt, *cache) == 2
    one_line_error(capsys, "torn.pt")


def test_cache_trouble_is_a_note_and_the_score_stands(tmp_path, ref_pt, capsys):
    torch.save(images(20, 0), tmp_path / "gen.pt")
    args = ["--gen", tmp_path / "gen.pt", "--ref", ref_pt, "--json"]
    assert fid(*args, "--cache-dir", tmp_path / "cache") == 0
    expected = fd_of(capsys)
    (entry,) = (tmp_path / "cache").glob("*.npz")
    entry.write_bytes(b"torn")
    assert fid(*args, "--cache-dir", tmp_path / "cache") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["fd"] == expected and f"note: cached reference statistics {entry}" in captured.err
    assert np.load(entry)["mu"].shape == (16,)  # recomputed and rewritten
    (tmp_path / "file").write_text("x")  # a cache folder that cannot be made or written
    assert fid(*args, "--cache-dir", tmp_path / "file" / "cache") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["fd"] == expected and "not cached" in captured.err


def test_a_cuda_device_without_a_gpu_is_one_line(tmp_path, ref_pt, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fid("--gen", ref_pt, "--ref", ref_pt, "--device", "cuda", "--cache-dir", tmp_path / "c") == 2
    one_line_error(capsys, "no CUDA GPU is available", "--device cpu")


def test_fd_prints_no_negative_zero_but_shows_a_real_negative(tmp_path, ref_pt, capsys):
    assert format_fd(-3e-9) == "0.000000" and format_fd(-3e-9, 3) == "0.000"
    assert format_fd(-0.01) == "-0.010000" and format_fd(2.5, 2) == "2.50"
    assert fid("--gen", ref_pt, "--ref", ref_pt, "--cache-dir", tmp_path / "c") == 0
    out = capsys.readouterr().out
    assert out.startswith("FD 0.000000") and "N=20" in out and "reference N=20" in out
