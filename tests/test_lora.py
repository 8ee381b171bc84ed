"""LoRA students (``lora:``; fewstep.distill.lora): every method trains only LoRA factors on the teacher's frozen
weights, a fused export is a plain pipeline of the teacher's class, a LoRA export loads on the teacher's own
pipeline with diffusers' ``load_lora_weights`` and samples what ``load_student`` samples, PD's rounds hand the
same adapter on, and what cannot be exported or resumed is refused up front."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fewstep.distill.core import Refused, checkpoint_paths, load_checkpoint
from fewstep.distill.families import TeacherError, load_teacher
from fewstep.distill.lora import LoRA, inject, lora_parameters, merged
from fewstep.distill.run import distill
from fewstep.distill.students import load_student

from test_distill import TINY_UNET, _config, tiny_teacher  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("one_thread")

METHOD_OPTIONS = {"progressive": {"start_steps": 4, "end_steps": 2},
                  "consistency": {"student_steps": 2, "teacher_steps": 4, "teacher_steps_end": 4},
                  "fdistill": {"update_ratio": 1}, "sim": {"update_ratio": 1}}
LORA = {"rank": 4}


def _run(teacher, idx_folder, out: Path, method: str, steps: int = 2, lora=LORA, **sections):
    options = {**METHOD_OPTIONS[method], **sections.pop(method, {})}
    config = _config(teacher, idx_folder, out, method=method, lora=lora, **{method: options}, **sections)
    config.train.steps = steps
    return distill(config)


def _base_and_lora(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A LoRA network's state split into its base weights (under the teacher's own keys) and its factors."""
    base = {k.replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k}
    return base, {k: v for k, v in state.items() if ".lora_" in k}


def _teacher_unet(teacher: Path):
    return load_teacher(teacher).denoiser_network


def _lora_net(teacher: Path, state: dict | None = None, rank: int = 4):
    from fewstep.distill.families import UNET_LORA_TARGETS

    net = inject(copy.deepcopy(_teacher_unet(teacher)), LoRA(rank=rank, targets=UNET_LORA_TARGETS))
    if state is not None:  # a checkpoint's LoRA student: its factors (the base is the teacher's)
        missing, unexpected = net.load_state_dict(state, strict=False)
        assert not unexpected and all(".lora_" not in k for k in missing), (missing, unexpected)
    return net


# -- the mechanism ----------------------------------------------------------------------------------------


def test_a_lora_starts_as_its_base_trains_only_its_factors_and_merges_into_the_same_function():
    from diffusers import UNet2DModel
    from fewstep.distill.families import UNET_LORA_TARGETS

    torch.manual_seed(0)
    base = UNet2DModel(**TINY_UNET)
    net = inject(copy.deepcopy(base), LoRA(rank=4, targets=UNET_LORA_TARGETS, alpha=8))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    assert torch.equal(net(x, t).sample, base(x, t).sample)  # B = 0: the teacher exactly
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert lora_parameters(net) == sum(p.numel() for p in net.parameters() if p.requires_grad)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    fused = merged(net)
    assert type(fused) is UNet2DModel and set(fused.state_dict()) == set(base.state_dict())
    assert (net(x, t).sample - base(x, t).sample).abs().max() > 1e-2
    torch.testing.assert_close(fused(x, t).sample, net(x, t).sample, atol=1e-5, rtol=0)


# -- every method on the tiny DDPM teacher ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["progressive", "consistency", "fdistill", "sim"])
def test_every_method_trains_only_lora_factors_and_exports_a_fused_ddpm_pipeline(tiny_teacher, idx_folder,
                                                                                 tmp_path, method):
    from diffusers import DDPMPipeline

    paths = _run(tiny_teacher, idx_folder, tmp_path / "run", method)
    teacher_unet = _teacher_unet(tiny_teacher)
    teacher = teacher_unet.state_dict()
    saved = load_checkpoint(checkpoint_paths(tmp_path / "run")[-1])["state"]
    trained = ["student"] if method in ("progressive", "consistency") else ["generator", "fake"]
    assert "teacher" not in saved["networks"]  # rebuilt from its folder on resume
    for name in trained:
        base, factors = _base_and_lora(saved["networks"][name])
        # the checkpoint holds what trains (the factors) and buffers, not the frozen base: it is the teacher's
        assert set(base) <= {k for k, _ in teacher_unet.named_buffers()}, f"{name}'s frozen base was saved"
        for store in (saved["emas"].get(name, {}),):
            assert set(_base_and_lora(store)[0]) <= {k for k, _ in teacher_unet.named_buffers()}
        assert any(v.abs().max() > 0 for k, v in factors.items() if ".lora_B." in k), f"{name}'s LoRA did not train"
        # the optimizer holds state for the LoRA factors alone
        held = sum(s["exp_avg"].numel() for s in saved["optimizers"][name]["state"].values())
        assert held == sum(v.numel() for v in factors.values())
    path = paths[-1]
    assert load_student(path).student["lora"] == {"rank": 4, "alpha": 4.0, "target_modules": list(
        load_teacher(tiny_teacher).lora_targets), "dropout": 0.0, "export": "fused",
        "parameters": sum(v.numel() for v in _base_and_lora(saved["networks"][trained[0]])[1].values())}
    exported = DDPMPipeline.from_pretrained(path)
    assert set(exported.unet.state_dict()) == set(teacher)  # a plain UNet2DModel: the LoRA is merged in
    assert any(not torch.equal(exported.unet.state_dict()[k], teacher[k]) for k in teacher)
    sampler = load_student(path)
    ours = sampler.sample(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    theirs = exported(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=sampler.nfe,
                      output_type="np").images
    assert abs(((ours.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy() - theirs).max() < 1e-5


def test_a_full_fake_score_beside_a_lora_generator(tiny_teacher, idx_folder, tmp_path):
    _run(tiny_teacher, idx_folder, tmp_path / "run", "sim", lora={"rank": 4, "fake": False})
    saved = load_checkpoint(checkpoint_paths(tmp_path / "run")[-1])["state"]
    assert not any(".lora_" in k for k in saved["networks"]["fake"])
    assert any(".lora_" in k for k in saved["networks"]["generator"])


def test_pd_rounds_hand_the_same_adapter_on(tiny_teacher, idx_folder, tmp_path):
    """Two rounds (4 -> 2 -> 1 steps, two updates each): round 1's teacher is round 0's student -- the teacher's
    base plus its LoRA -- and round 1's student continues that LoRA; the base never moves; each round's fused
    export is the teacher's weights with that round's LoRA merged in."""
    from diffusers import UNet2DModel

    out = tmp_path / "pd"
    paths = _run(tiny_teacher, idx_folder, out, "progressive", steps=4,
                 progressive={"start_steps": 4, "end_steps": 1}, train={"keep_checkpoints": 4})
    assert [p.name for p in paths] == ["progressive-2", "progressive-1"]
    ckpt = {int(p.stem.split("-")[1]): load_checkpoint(p)["state"]["networks"] for p in checkpoint_paths(out)}
    round0 = ckpt[2]["student"]  # the end of round 0 (round 1 starts after this checkpoint)
    assert all(torch.equal(ckpt[3]["previous"][k], v) for k, v in round0.items())  # teacher <- student
    teacher = _teacher_unet(tiny_teacher).state_dict()
    for step in (3, 4):  # round 1's teacher (the previous student, saved whole): the base never moved
        base, _ = _base_and_lora(ckpt[step]["previous"])
        assert all(torch.equal(base[k], teacher[k]) for k in teacher)
    # round 1 trains on from round 0's LoRA: one update later it has moved, but not far
    _, f2 = _base_and_lora(round0)
    _, f3 = _base_and_lora(ckpt[3]["student"])
    assert any(not torch.equal(f2[k], f3[k]) for k in f2)
    for path, state in ((paths[0], round0), (paths[1], ckpt[4]["student"])):
        fused = merged(_lora_net(tiny_teacher, state)).state_dict()
        exported = UNet2DModel.from_pretrained(path / "unet").state_dict()
        assert all(torch.allclose(exported[k], fused[k], atol=1e-6, rtol=0) for k in fused), path.name


# -- a LoRA export on Stable Diffusion ------------------------------------------------------------------


def test_an_sd_lora_student_loads_on_the_teachers_pipeline_as_load_student_samples_it(tmp_path):
    pytest.importorskip("transformers")
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from fewstep.config import DistillConfig, from_dict

    from test_distill_families import PROMPTS, caption_folder
    from test_family_sd import tiny_sd_pipeline

    teacher = tiny_sd_pipeline(tmp_path)
    data = {"name": f"folder:{caption_folder(tmp_path / 'caps', 16)}"}
    values = {"teacher": str(teacher), "method": "consistency", "data": data,
              "train": {"output_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 4, "lr": 1e-3,
                        "checkpoint_every": 1, "log_every": 1, "progress": False, "cpu": True, "ema_decay": 0.0},
              "consistency": METHOD_OPTIONS["consistency"], "lora": {"rank": 4, "alpha": 8, "export": "lora"}}
    (path,) = distill(from_dict(DistillConfig, values))
    assert sorted(p.name for p in path.iterdir()) == ["fewstep_student.json", "pytorch_lora_weights.safetensors",
                                                      "scheduler"]

    pipe = StableDiffusionPipeline.from_pretrained(teacher)
    pipe.load_lora_weights(path)
    pipe.scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    theirs = pipe(PROMPTS, latents=x_T.clone(), num_inference_steps=2, guidance_scale=1.0, output_type="latent").images
    student = load_student(path)
    assert student.nfe == 2 and student.student["lora"]["export"] == "lora"
    ours = student.sample(x_T.clone(), prompt=PROMPTS, output_type="latent")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    plain = StableDiffusionPipeline.from_pretrained(teacher)  # the teacher alone, on the student's grid
    plain.scheduler = pipe.scheduler
    plain.set_progress_bar_config(disable=True)
    before = plain(PROMPTS, latents=x_T.clone(), num_inference_steps=2, guidance_scale=1.0, output_type="latent").images
    assert (before - ours).abs().max() > 1e-4, "the LoRA changed nothing"

    # a LoRA student as the start of another (student_init): the teacher's UNet with the LoRA merged in
    from fewstep.distill.students import lora_student_network

    net = lora_student_network(path, load_teacher(teacher))
    assert type(net) is type(pipe.unet) and not any(".lora_" in k for k in net.state_dict())
    z, t, text = x_T, torch.tensor([999, 500]), torch.randn(2, 77, 32)
    torch.testing.assert_close(net(z, t, encoder_hidden_states=text).sample,
                               pipe.unet(z, t, encoder_hidden_states=text).sample, atol=1e-5, rtol=0)


# -- refusals ------------------------------------------------------------------------------------------


def test_a_lora_only_export_of_a_pipeline_without_a_lora_loader_is_refused_before_training(tiny_teacher,
                                                                                           idx_folder, tmp_path):
    with pytest.raises(TeacherError, match="use lora.export=fused") as err:
        _run(tiny_teacher, idx_folder, tmp_path / "run", "consistency", lora={"rank": 4, "export": "lora"})
    assert "\n" not in str(err.value) and "DDPMPipeline" in str(err.value)
    assert not checkpoint_paths(tmp_path / "run")


def test_a_lora_run_resumes_bitwise_and_resuming_with_another_rank_is_refused(tiny_teacher, idx_folder, tmp_path):
    def config(out, rank=4):
        return _config(tiny_teacher, idx_folder, out, method="consistency", lora={"rank": rank},
                       consistency=METHOD_OPTIONS["consistency"], train={"steps": 3, "ema_decay": 0.9})

    distill(config(tmp_path / "whole"))
    distill(config(tmp_path / "split"), max_steps=1)
    with pytest.raises(Refused, match=r"lora\.rank: 4 -> 8"):
        distill(config(tmp_path / "split", rank=8))
    distill(config(tmp_path / "split"))
    whole, split = (load_checkpoint(checkpoint_paths(tmp_path / d)[-1])["state"] for d in ("whole", "split"))
    for part in ("networks", "emas"):
        assert all(torch.equal(v, split[part]["student"][k]) for k, v in whole[part]["student"].items())
    # the EMA of a LoRA student averages its factors; its base is the student's own (shared, never copied or saved)
    base, factors = _base_and_lora(whole["emas"]["student"])
    assert factors and set(base) <= {k for k, _ in _teacher_unet(tiny_teacher).named_buffers()}


def test_a_w_conditioned_lora_student_trains_its_new_guidance_embedding_in_full(tmp_path):
    pytest.importorskip("transformers")
    from fewstep.distill.conditioning import Conditioning, Guidance
    from test_family_sd import tiny_sd_pipeline

    family = load_teacher(tiny_sd_pipeline(tmp_path))
    cond = Conditioning(family, Guidance(mode="conditioned"), lora=LoRA(rank=4, targets=family.lora_targets))
    net = cond.student_network(family.denoiser_network)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert "time_embedding.cond_proj.weight" in trainable
    assert all(".lora_" in n for n in trainable - {"time_embedding.cond_proj.weight"})
    assert not any(p.requires_grad for p in family.denoiser_network.parameters())


def test_the_example_lora_config_loads():
    from fewstep.config import DistillConfig, load

    config = load(DistillConfig, Path(__file__).parents[1] / "configs/distill/consistency_fmnist_lora.yaml", [])
    assert config.lora.rank == 16 and config.lora.export == "fused" and config.method == "consistency"


def test_a_lora_students_ema_shares_its_frozen_base_and_copies_only_the_factors(tiny_teacher):
    from fewstep.distill.core import Network, OptimizerConfig, TrainState, _ema_update
    from accelerate import Accelerator

    net = _lora_net(tiny_teacher)
    state = TrainState({"student": Network(net, OptimizerConfig(lr=1e-3, ema_decay=0.5))}, Accelerator(cpu=True))
    ema, live = state.emas["student"], state.unwrapped("student")
    shared = {n for (n, e), (_, p) in zip(ema.named_parameters(), live.named_parameters())
              if e.data_ptr() == p.data_ptr()}
    frozen = {n for n, p in live.named_parameters() if not p.requires_grad}
    assert shared == frozen and frozen  # the base: the same tensors; the factors: copies
    with torch.no_grad():
        for name, p in live.named_parameters():
            if p.requires_grad:
                p.add_(1.0)
    _ema_update(ema, live, 0.5)
    for (name, e), (_, p) in zip(ema.named_parameters(), live.named_parameters()):
        if name not in frozen:  # halfway to the moved factor
            torch.testing.assert_close(e, p - 0.5)
