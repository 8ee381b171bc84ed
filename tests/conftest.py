"""Shared test fixtures: tiny, randomly initialised diffusers models built from configs (no downloads).

Random UNets predict noise that has nothing to do with their input, so a few solver steps blow the
sample up. ``near_consistent`` makes a network's output stay close to a self-consistent prediction
(``eps ~ x`` or ``v ~ 0``, i.e. ``x0_hat ~ (1 - sigma) x / alpha`` or ``alpha x``: of order one at
every noise level), plus a small random, input- and time-dependent part that still makes every
solver step depend on the network.
diffusers is imported inside the fixtures, so test files that do not use them never pay for it.
``random_inception_weights``: torch-fidelity's Inception with random weights, as a local file.
``interrupt_and_resume``: signal a ``fewstep train-*`` command mid-run, then rerun it.
"""

from __future__ import annotations

import pytest
import torch

#: A tiny 8x8 one-channel UNet2DModel: the random teacher of the distillation tests.
TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 norm_num_groups=4)

#: The consistent part, a multiple of ``x``: ``eps ~ x``; ``v ~ 0`` (then ``x0 = alpha x``, ``eps = sigma x``).
_BASE = {"epsilon": 1.0, "v_prediction": 0.0}


def near_consistent(model_cls):
    """A subclass of a diffusers model class returning ``base * x + scale * model(x, t, ...)``.

    Keeps the model's config, ``dtype``, ``device`` and both output conventions (``.sample`` and
    ``return_dict=False``), so diffusers pipelines call it like the original.
    """

    class NearConsistent(model_cls):
        prediction_type = "epsilon"
        scale = 0.01

        def forward(self, sample, timestep, *args, return_dict: bool = True, **kwargs):
            out = super().forward(sample, timestep, *args, return_dict=True, **kwargs)
            value = _BASE[self.prediction_type] * sample + self.scale * out.sample
            return type(out)(sample=value) if return_dict else (value,)

    NearConsistent.__name__ = NearConsistent.__qualname__ = f"NearConsistent{model_cls.__name__}"
    return NearConsistent


def _seeded(seed: int):
    torch.manual_seed(seed)


@pytest.fixture(scope="session")
def make_tiny_unet():
    """``make(prediction_type="epsilon", sample_size=8, channels=3)``: a ~0.16M-parameter UNet2DModel."""
    from diffusers import UNet2DModel

    cls = near_consistent(UNet2DModel)

    def make(prediction_type: str = "epsilon", sample_size: int = 8, channels: int = 3, seed: int = 0):
        _seeded(seed)
        unet = cls(sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
                   block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
        unet.prediction_type = prediction_type
        return unet

    return make


@pytest.fixture(scope="session")
def tiny_sd_components():
    """Components of a Stable-Diffusion-style pipeline, tiny: conditional UNet (4 latent channels,
    cross-attention dim 32), a one-level AutoencoderKL and a one-layer CLIP text encoder."""
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _seeded(0)
    unet = near_consistent(UNet2DConditionModel)(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        layers_per_block=1, norm_num_groups=8).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                max_position_embeddings=16, bos_token_id=0,
                                                eos_token_id=2, pad_token_id=1)).eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors run fastest on one thread (and a busy 2-core machine makes two threads thrash);
    use per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def idx_folder(tmp_path):
    """A fake Fashion-MNIST folder: 64 train / 16 test random 8x8 'images' in gzipped IDX files."""
    return write_fake_fashion_mnist(tmp_path)


def write_fake_fashion_mnist(root, labels=None):
    """64 train / 16 test random 8x8 'images' (seed 0) in gzipped IDX files under ``root``; labels 0, 1, ...
    (or ``labels(n)``, bytes)."""
    import gzip
    import struct

    g = torch.Generator().manual_seed(0)
    for split, n in [("train", 64), ("t10k", 16)]:
        images = torch.randint(0, 256, (n, 8, 8), generator=g, dtype=torch.uint8)
        with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", n, 8, 8) + images.numpy().tobytes())
        with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", n) + (labels(n) if labels else bytes(range(n))))
    return root



@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A local ``inception-v3-compat`` weights file with random weights (``fewstep.eval.features.save_random_inception_weights``)."""
    from fewstep.eval.features import save_random_inception_weights

    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


@pytest.fixture
def interrupt_and_resume():
    """``run(command, config_file, out, signum) -> (interrupted, rerun, saved_step)``: start
    ``fewstep COMMAND --config FILE``, send ``signum`` once it has written a checkpoint in ``out``, then rerun
    the same command for one more step. Checks what every training command owes its user: the signal's
    exit code (128 + signum), one line on stderr (no traceback) naming the step saved, and a rerun that
    resumes there."""
    import subprocess
    import sys
    import time

    from fewstep.distill.core import checkpoint_paths

    def step(path):
        return int(path.stem.split("-")[1])

    def run(command, config_file, out, signum):
        cmd = [sys.executable, "-m", "fewstep.cli", command, "--config", str(config_file)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not checkpoint_paths(out):
            time.sleep(0.05)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signum, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in stderr, stderr
        saved = step(checkpoint_paths(out)[-1])
        assert f"saved step {saved} " in lines[0] and "run the same command again to resume" in lines[0], lines
        rerun = subprocess.run(cmd + ["--max-steps", "1"], capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert f"resuming {out} at step {saved} " in rerun.stdout, rerun.stdout
        assert step(checkpoint_paths(out)[-1]) == saved + 1
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), rerun, saved

    return run


def free_port() -> str:
    """A TCP port free now, for ``accelerate launch --main_process_port`` (two launches at once would both
    take the default 29500 and one would fail)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
