"""Peak memory of ``fewstep distill``, per method, measured on tiny Stable-Diffusion-shaped teachers and
extrapolated to SD 1.5 and SDXL (issue 25, item 5; results in docs/memory.md).

    python benchmarks/distill_memory.py            # the full grid (resumable), writes docs/memory.md
    python benchmarks/distill_memory.py --quick    # one width, two methods: a couple of minutes

**Measured** (CPU): every configuration -- method (progressive, consistency, fdistill, sim) x student (full,
LoRA rank 16) x frozen teacher (float32, bfloat16) x gradient checkpointing (off, on) x UNet width x batch
size -- runs ``fewstep.distill.run.distill(config, max_steps=2)`` in a fresh subprocess. Right before the call
the process resets its kernel high-water mark (``echo 5 > /proc/self/clear_refs``: VmHWM := VmRSS) and reads
its resident set (the baseline); after it, VmHWM is the exact peak of the whole call (the kernel tracks it at
page granularity, so no spike between samples is missed, and nothing from the imports before counts, which
a ``ru_maxrss`` difference cannot promise). ``peak - baseline`` is what the run cost; the teacher's pipeline
is loaded inside the call, so its weights are part of it. Then a census of the live objects (the core's
``TrainState`` and the teacher pipeline, captured by wrapping ``fit`` and ``_load_teacher``) counts the bytes
of every distinct tensor storage the run holds: each network, EMA, optimizer state. **Remainder** = peak -
held - gradients (one trainable network's, in float32: the core frees them after each update): activations
plus the allocator's and the run's transients.

**Analytic** (``held_model``): the networks each method holds, read from the code (distill/core.py,
conditioning.py, progressive.py, consistency.py, matching.py, lora.py), with bytes per parameter; it is
checked against the census. **Fit**: per (method, student, teacher dtype, checkpointing), ``remainder =
gamma + rho * P_unet + beta * 4 * A * batch``, where ``A`` is the UNet's forward activation count per example
(elements output by its leaf modules, counted on the meta device, so it is exact for any config, SD 1.5's and
SDXL's included) and ``beta`` (saved bytes per float32 forward-output byte) is the transferable number.
**Extrapolated**: weights, gradients and AdamW states exactly from the parameter counts; activations
``beta * 4 * A * batch``, halved for bf16 mixed precision on a GPU (an assumption); plus an assumed 1 GiB of CUDA
context and allocator slack.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
MiB = 2**20

METHODS = ("progressive", "consistency", "fdistill", "sim")
WIDTHS = (32, 64, 128)  # block_out_channels (w, 2w)
BATCHES = (2, 8)
LATENT = 32  # latent side of the tiny teachers (images 64 px through a 2-level VAE)
LORA_RANK = 16
QUICK = {"widths": (32,), "methods": ("progressive", "sim"), "loras": (0, LORA_RANK), "dtypes": ("float32",),
         "checkpointing": (False,), "batches": BATCHES}
FULL = {"widths": WIDTHS, "methods": METHODS, "loras": (0, LORA_RANK), "dtypes": ("float32", "bfloat16"),
        "checkpointing": (False, True), "batches": BATCHES}
#: The networks each method's steps run with gradients at once (activations scale with this).
GPU_SLACK = 1 * GiB  # assumed CUDA context + caching-allocator slack on a GPU
BUDGETS = (24, 80)  # GB of the GPUs in the table


# ---------------------------------------------------------------------------------------------
# Tiny SD-shaped teachers, built from configs (no downloads)


WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "car")
PROMPTS = ("a photo of a cat", "a blue car", "a red dog", "a photo of a car")
TEXT_LEN, TEXT_DIM = 16, 32


def tiny_unet_config(width: int, latent: int = LATENT) -> dict:
    """SD's layout at toy size: a cross-attention level over a plain one, channels ``(width, 2 width)``."""
    return dict(sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(width, 2 * width), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
                attention_head_dim=8, norm_num_groups=8)


def _tokenizer(folder: Path):
    """A CLIP BPE tokenizer over letters and ``WORDS`` (written offline, as tests/test_family_sd.py does)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=TEXT_LEN)


def tiny_sd_pipeline(folder: Path, width: int, latent: int = LATENT) -> Path:
    """A random ``StableDiffusionPipeline`` folder whose UNet is ``tiny_unet_config(width)``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    tokenizer = _tokenizer(folder.parent / f"{folder.name}-vocab")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TEXT_LEN,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=2 * latent)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer,
                                   unet=UNet2DConditionModel(**tiny_unet_config(width, latent)), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def caption_folder(folder: Path, size: int, n: int = 16) -> Path:
    """``n`` random images with captions in metadata.jsonl (``data.name=folder:PATH``)."""
    import torch
    from PIL import Image

    if (folder / "metadata.jsonl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    lines = []
    for i in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": PROMPTS[i % len(PROMPTS)]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# The reference models (configs as published on the Hugging Face Hub; parameters in the issue)


SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
#: name -> (UNet config, text length, text encoders' and VAE's parameters: host memory in fewstep's runs)
REFERENCE_MODELS = {"SD 1.5": (SD15_UNET, 77, {"text_encoder": 123e6, "vae": 84e6}),
                    "SDXL": (SDXL_UNET, 77, {"text_encoders": 817e6, "vae": 84e6})}


def _unet_inputs(config: dict, batch: int = 1, text_len: int = TEXT_LEN):
    import torch

    s = config["sample_size"]
    kwargs = {"encoder_hidden_states": torch.randn(batch, text_len, config["cross_attention_dim"])}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.randn(batch, 6)}
    return torch.randn(batch, config["in_channels"], s, s), torch.full((batch,), 500), kwargs


def lora_parameter_count(net, rank: int, targets) -> int:
    """peft's LoRA factors for ``targets`` (module-name suffixes): ``r (d_in + d_out)`` per Linear,
    ``r (C_in k k + C_out)`` per Conv2d."""
    from torch import nn

    total = 0
    for name, module in net.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += rank * (module.in_channels * k // module.groups + module.out_channels)
    return total


def unet_counts(config: dict, lora_rank: int = LORA_RANK, text_len: int = TEXT_LEN) -> dict:
    """Parameters, LoRA parameters (SD's default targets) and forward activation elements per example
    (outputs of every leaf module in one forward pass) of a ``UNet2DConditionModel``, on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel

    from fewstep.distill.families import UNET_LORA_TARGETS

    with torch.device("meta"):
        net = UNet2DConditionModel(**config)
    total = [0]

    def count(module, inputs, output):
        if torch.is_tensor(output):
            total[0] += output.numel()

    for module in net.modules():
        if not list(module.children()):
            module.register_forward_hook(count)
    with torch.device("meta"), torch.no_grad():
        x, t, kwargs = _unet_inputs(config, 1, text_len)
        net(x, t, **kwargs)
    return {"params": sum(p.numel() for p in net.parameters()),
            "lora_params": lora_parameter_count(net, lora_rank, UNET_LORA_TARGETS),
            "activations": total[0]}


# ---------------------------------------------------------------------------------------------
# What each method holds (read from the code), in bytes per parameter


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Setting:
    """One configuration of a run (without the size: width, or the model, and batch)."""

    method: str
    lora: int = 0  # LoRA rank (0: full students)
    frozen_dtype: str = "float32"
    checkpointing: bool = False
    ema: bool = True  # train.ema_decay > 0 (the default 0.999)

    @property
    def key(self) -> str:
        return (f"{self.method}/{'lora' + str(self.lora) if self.lora else 'full'}/{self.frozen_dtype}/"
                f"{'ckpt' if self.checkpointing else 'nockpt'}{'' if self.ema else '/noema'}")


def held_model(s: Setting, params: int, lora_params: int) -> dict:
    """The networks ``s`` holds on the training device, with their bytes, and the trainable parameters
    (per trainable network). From the code:

    - the teacher (TrainState: frozen networks cast to ``frozen_dtype``): every method; consistency
      holds a deep copy (consistency.py), so the pipeline's own float32 UNet stays behind on the host;
    - the student / generator (``Conditioning.student_network``: a deep copy, trainable, so float32;
      a LoRA student's frozen base weights are in that copy, float32 too);
    - the fake score (fdistill, sim): another such copy (a LoRA one when ``lora.fake``: the default);
    - the EMA of the student / generator when ``train.ema_decay > 0`` (core ``_frozen_copy``: a deep copy
      of the whole network, a LoRA student's base included, float32); critics keep none;
    - progressive's ``previous`` (the next rounds' teacher): a deep copy of the student made at the start,
      frozen, so cast to ``frozen_dtype``; held from round 0 on.
    """
    fd = DTYPE_BYTES[s.frozen_dtype]
    student = params + (lora_params if s.lora else 0)
    nets = {"teacher": params * fd, "student": student * 4}
    trainable = {"student": lora_params if s.lora else params}
    if s.method in ("fdistill", "sim"):
        nets["fake"] = student * 4
        trainable["fake"] = trainable["student"]
    if s.ema:
        nets["ema"] = student * 4
    if s.method == "progressive":
        nets["previous"] = student * fd
    return {"networks": nets, "trainable": trainable,
            "weights": sum(nets.values()),
            "grads": 4 * max(trainable.values()),  # freed (set_to_none) after each network's update
            "adamw": 8 * sum(trainable.values())}  # exp_avg + exp_avg_sq, float32


def host_model(s: Setting, params: int, host_params: dict) -> int:
    """Bytes the run keeps on the host (the pipeline, on the CPU for the whole run: fewstep's
    ``load_teacher`` default): its text encoder(s) and VAE in float32, and for consistency the pipeline's
    own float32 UNet (the method trains against a copy)."""
    return int(4 * sum(host_params.values()) + (4 * params if s.method == "consistency" else 0))


# ---------------------------------------------------------------------------------------------
# One measured run (in its own process)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _census(state, family) -> dict:
    """Bytes of the distinct tensor storages the run holds, by what holds them (first owner wins)."""
    import torch

    seen: set[int] = set()
    out: dict[str, int] = {}

    def add(what: str, tensors) -> None:
        for t in tensors:
            if not torch.is_tensor(t):
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen or t.device.type == "meta":
                continue
            seen.add(ptr)
            out[what] = out.get(what, 0) + t.untyped_storage().nbytes()

    for name, module in state.modules.items():
        module = state.unwrapped(name)
        add(f"net:{name}", [*module.parameters(), *module.buffers()])
    for name, module in state.emas.items():
        add(f"ema:{name}", [*module.parameters(), *module.buffers()])
    for name, opt in state.optimizers.items():
        add(f"adamw:{name}", [v for st in opt.state.values() for v in st.values()])
    for name, component in family.pipe.components.items():
        if hasattr(component, "parameters"):
            add(f"pipeline:{name}", [*component.parameters(), *component.buffers()])
    trainable = {name: sum(p.numel() for p in state.unwrapped(name).parameters() if p.requires_grad)
                 for name, net in state.specs.items() if net.trainable}
    return {"bytes": out, "trainable": trainable}


def _run_config(spec: dict) -> dict:
    from fewstep.config import DistillConfig, from_dict

    values = {"teacher": spec["teacher"], "method": spec["method"], "cache": spec["cache"],
              "data": {"name": f"folder:{spec['data']}"},
              "train": {"output_dir": spec["output_dir"], "steps": 1000, "batch_size": spec["batch"], "lr": 1e-5,
                        "checkpoint_every": 1000, "log_every": 1, "progress": False, "cpu": True,
                        "ema_decay": 0.999 if spec.get("ema", True) else 0.0, "frozen_dtype": spec["frozen_dtype"],
                        "gradient_checkpointing": spec["checkpointing"]},
              "fdistill": {"update_ratio": 1}, "sim": {"update_ratio": 1}}  # both networks update every step
    if spec["lora"]:
        values["lora"] = {"rank": spec["lora"]}
    return from_dict(DistillConfig, values)


def worker(spec: dict) -> dict:
    """Measure one configuration (this process does nothing else)."""
    import torch

    torch.set_num_threads(1)
    import fewstep.distill.run as run_module
    from fewstep.distill.prepare import prepare_data

    config = _run_config(spec)
    if spec.get("prepare"):  # only write the data cache (latents and text embeddings), unmeasured
        family = run_module._load_teacher(config.teacher)
        prepare_data(family, config, spec["method"] in ("progressive", "consistency"), Path(config.cache))
        return {}
    captured = {}
    fit, load = run_module.fit, run_module._load_teacher

    def fit_spy(*args, **kwargs):
        captured["result"] = fit(*args, **kwargs)
        return captured["result"]

    def load_spy(path):
        captured["family"] = load(path)
        return captured["family"]

    # A warm-up run first (same settings, one step, batch 2, its own folder): the lazy imports and library
    # state of a run (diffusers' pipeline classes, peft, accelerate, matplotlib, oneDNN kernels) are then in
    # the baseline, not in the measured peak. Its freed memory goes back to the kernel: large blocks are
    # mmapped at a fixed threshold (MALLOC_MMAP_THRESHOLD_, set by the parent), so the heap does not keep it.
    run_module.distill(_run_config({**spec, "batch": 2, "output_dir": spec["output_dir"] + "-warmup"}), max_steps=1)
    run_module.fit, run_module._load_teacher = fit_spy, load_spy
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline, hwm0 = _status("VmRSS"), _status("VmHWM")
    start = time.perf_counter()
    run_module.distill(config, max_steps=2)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    census = _census(captured["result"].state, captured["family"])
    return {"baseline": baseline, "hwm_reset": hwm0, "peak": peak, "delta": peak - baseline, "seconds": seconds,
            **census}


# ---------------------------------------------------------------------------------------------
# The grid, the cache, the subprocesses


def grid(plan: dict) -> list[dict]:
    """Every configuration of ``plan``, ordered so that a partial run already covers every setting at the
    first width (the fit needs two batch sizes) before it moves to the next width."""
    out = []
    for width in plan["widths"]:
        for method in plan["methods"]:
            for lora in plan["loras"]:
                for dtype in plan["dtypes"]:
                    for ckpt in plan["checkpointing"]:
                        for batch in plan["batches"]:
                            out.append({"method": method, "lora": lora, "frozen_dtype": dtype, "checkpointing": ckpt,
                                        "width": width, "batch": batch})
    return out


def config_key(c: dict) -> str:
    return f"{Setting(c['method'], c['lora'], c['frozen_dtype'], c['checkpointing']).key}/w{c['width']}/b{c['batch']}"


def _subprocess(spec: dict, timeout: float = 1800) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}) for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(plan: dict, work: Path, cache_file: Path, on_result=None) -> dict:
    """Run every configuration of ``plan`` not yet in ``cache_file`` (one subprocess each); returns the cache."""
    results = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    todo = [c for c in grid(plan) if config_key(c) not in results]
    for i, c in enumerate(todo):
        width = c["width"]
        teacher = tiny_sd_pipeline(work / f"teacher-w{width}", width)
        data = caption_folder(work / "data", 2 * LATENT)
        kind = "images" if c["method"] in ("progressive", "consistency") else "conditions"
        spec = {**c, "teacher": str(teacher), "data": str(data), "cache": str(work / f"prepared-w{width}-{kind}.pt"),
                "output_dir": str(work / "run")}
        if not Path(spec["cache"]).is_file():
            _subprocess({**spec, "prepare": True})
        for folder in ("run", "run-warmup"):
            shutil.rmtree(work / folder, ignore_errors=True)
        t0 = time.perf_counter()
        try:
            out = _subprocess(spec)
        except (RuntimeError, subprocess.TimeoutExpired) as err:  # reported, not cached: a rerun tries again
            print(f"[{i + 1}/{len(todo)}] {config_key(c)}: FAILED {str(err)[-1500:]}", flush=True)
            continue
        for folder in ("run", "run-warmup"):
            shutil.rmtree(work / folder, ignore_errors=True)
        results[config_key(c)] = {**c, **out}
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
        tmp.replace(cache_file)
        print(f"[{i + 1}/{len(todo)}] {config_key(c)}: +{out['delta'] / MiB:.1f} MiB "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if on_result is not None:
            on_result(results)
    return results


# ---------------------------------------------------------------------------------------------
# Analysis: components, fit, extrapolation


def components(r: dict, counts: dict) -> dict:
    """A measured run split into what it holds (census), gradients (analytic) and the remainder."""
    s = Setting(r["method"], r["lora"], r["frozen_dtype"], r["checkpointing"])
    model = held_model(s, counts["params"], counts["lora_params"])
    held = sum(r["bytes"].values())
    pipeline_other = sum(v for k, v in r["bytes"].items() if k.startswith("pipeline:"))
    return {"delta": r["delta"], "held": held, "grads": model["grads"], "remainder": r["delta"] - held - model["grads"],
            "analytic_device": model["weights"] + model["adamw"], "census_device": held - pipeline_other,
            "host": pipeline_other}


def fit(points: list[tuple[float, float, float]]) -> dict:
    """Least squares ``remainder = gamma [+ rho P] + beta * (4 A B)`` over ``(P, 4 A B, remainder)``;
    the ``rho P`` column only when there are two or more widths."""
    import numpy as np

    P = np.array([p[0] for p in points], float)
    X = np.array([p[1] for p in points], float)
    y = np.array([p[2] for p in points], float)
    cols = [np.ones_like(X), X] + ([P] if len(set(P)) > 1 else [])
    coef, *_ = np.linalg.lstsq(np.stack(cols, 1), y, rcond=None)
    pred = np.stack(cols, 1) @ coef
    return {"gamma": float(coef[0]), "beta": float(coef[1]), "rho": float(coef[2]) if len(coef) > 2 else None,
            "max_error": float(np.abs(pred - y).max()), "points": len(points)}


def fits(results: dict, counts_by_width: dict) -> dict:
    """One fit per setting (method, student, teacher dtype, checkpointing) over widths and batches."""
    groups: dict[str, list] = {}
    for r in results.values():
        counts = counts_by_width[r["width"]]
        key = Setting(r["method"], r["lora"], r["frozen_dtype"], r["checkpointing"]).key
        c = components(r, counts)
        groups.setdefault(key, []).append((counts["params"], 4 * counts["activations"] * r["batch"], c["remainder"]))
    return {k: fit(v) for k, v in groups.items() if len({p[1] for p in v}) >= 2}


def extrapolate(s: Setting, params: int, lora_params: int, activations: int, batch: int, beta: float,
                mixed_precision_factor: float = 0.5) -> dict:
    """GPU memory of setting ``s`` on a UNet of ``params`` parameters and ``activations`` forward elements
    per example: exact weights, gradients and AdamW states, plus ``beta`` x the forward bytes x batch
    (x ``mixed_precision_factor``: bf16 activations) plus ``GPU_SLACK``."""
    m = held_model(s, params, lora_params)
    act = beta * 4 * activations * batch * mixed_precision_factor
    total = m["weights"] + m["grads"] + m["adamw"] + act + GPU_SLACK
    return {"weights": m["weights"], "grads": m["grads"], "adamw": m["adamw"], "activations": act, "total": total}


def table(betas: dict, reference: dict, batches=(1, 4, 16)) -> list[dict]:
    """For every fitted setting and reference model: GB at each batch size and which GPUs it fits."""
    rows = []
    for model, counts in reference.items():
        for key, f in sorted(betas.items(), key=lambda kv: _order(kv[0])):
            s = _setting(key)
            sizes = [extrapolate(s, counts["params"], counts["lora_params"], counts["activations"], b,
                                 max(f["beta"], 0.0)) for b in batches]
            rows.append({"model": model, "setting": key, "fixed_gb": (sizes[0]["total"] - sizes[0]["activations"]) / 1e9,
                         "gb": [x["total"] / 1e9 for x in sizes], "batches": list(batches)})
    return rows


def _setting(key: str) -> Setting:
    method, student, dtype, ckpt, *rest = key.split("/")
    return Setting(method, 0 if student == "full" else int(student[4:]), dtype, ckpt == "ckpt", not rest)


def _order(key: str):
    s = _setting(key)
    return METHODS.index(s.method), s.lora, s.frozen_dtype != "float32", s.checkpointing


def fits_in(gb: float) -> str:
    return next((f"{b}" for b in BUDGETS if gb <= b), "no")


# ---------------------------------------------------------------------------------------------
# The report


def report(results: dict, counts_by_width: dict, reference: dict, command: str, progress: str = "") -> str:
    lines = ["# Memory of `fewstep distill`: measured on tiny SD teachers, extrapolated to SD 1.5 and SDXL", "",
             "Reproduce (resumable; results cached per configuration in `docs/memory.json`):", "",
             f"    {command}", "", *([progress + ".", ""] if progress else []),
             "Written by `benchmarks/distill_memory.py` (its docstring has the method). **Measured** below means a "
             "number from a run on the CPU; **analytic** a count of parameters x bytes per parameter from the code; "
             "**extrapolated** the model fitted here applied to SD 1.5 / SDXL, which were never run.", ""]
    lines += _what_is_held()
    lines += ["## Measured (CPU, tiny SD-shaped teachers)", "",
              f"Tiny `StableDiffusionPipeline`s: UNet `block_out_channels=(w, 2w)` (CrossAttnDown + Down, 1 layer "
              f"per block, 8 heads), {LATENT}x{LATENT}x4 latents, CLIP text encoder (hidden {TEXT_DIM}, 2 layers), "
              f"2-level VAE; 2 optimizer steps of `distill(config, max_steps=2)`, `ema_decay` 0.999, "
              f"`fdistill/sim.update_ratio` 1, LoRA rank {LORA_RANK} on SD's default targets. Peak = VmHWM after "
              "resetting it right before the call (`/proc/self/clear_refs`), minus VmRSS then. Per width:", ""]
    lines += ["| width | UNet params | LoRA r16 params | forward elements / example (A) |", "|---|---|---|---|"]
    for w, c in sorted(counts_by_width.items()):
        lines.append(f"| {w} | {c['params']:,} | {c['lora_params']:,} | {c['activations']:,} |")
    lines += ["", "Per run (MiB): peak above baseline; held = census of distinct tensor storages (networks, EMAs, "
              "AdamW states, the pipeline's text encoder / VAE / left-behind UNet); grads = one trainable "
              "network's, float32 (analytic); remainder = peak - held - grads (activations + transients); "
              "analytic/census = the held_model count of device weights + AdamW over the census of the same.", "",
              "| setting | width | batch | peak | held | grads | remainder | analytic/census | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(results.items(), key=lambda kv: (_order(Setting(kv[1]["method"], kv[1]["lora"],
                                                                          kv[1]["frozen_dtype"],
                                                                          kv[1]["checkpointing"]).key),
                                                          kv[1]["width"], kv[1]["batch"])):
        c = components(r, counts_by_width[r["width"]])
        s = Setting(r["method"], r["lora"], r["frozen_dtype"], r["checkpointing"]).key
        lines.append(f"| {s} | {r['width']} | {r['batch']} | {c['delta'] / MiB:.1f} | {c['held'] / MiB:.1f} | "
                     f"{c['grads'] / MiB:.1f} | {c['remainder'] / MiB:.1f} | "
                     f"{c['analytic_device'] / max(c['census_device'], 1):.3f} | {r['seconds']:.0f} |")
    betas = fits(results, counts_by_width)
    lines += ["", "## Fit", "",
              "Per setting, least squares `remainder = gamma + rho * P_unet + beta * 4 * A * batch` over its widths "
              "and batch sizes (`rho` only with two or more widths): `beta` is the activation memory per byte of "
              "float32 forward output (A elements per example, counted on the meta device), the number that "
              "transfers to other UNets; gamma / rho absorb the constant and weight-sized transients of the CPU "
              "run (loading, the checkpoint write).", "",
              "| setting | beta | gamma (MiB) | rho (B/param) | max error (MiB) | points |", "|---|---|---|---|---|---|"]
    for key, f in sorted(betas.items(), key=lambda kv: _order(kv[0])):
        rho = "-" if f["rho"] is None else f"{f['rho']:.2f}"
        lines.append(f"| {key} | {f['beta']:.2f} | {f['gamma'] / MiB:.1f} | {rho} | {f['max_error'] / MiB:.1f} | "
                     f"{f['points']} |")
    lines += ["", "## Extrapolated to SD 1.5 and SDXL (GPU, bf16 mixed precision)", "",
              "| model | UNet params | LoRA r16 params | A / example | host (text encoders + VAE, fp32) |",
              "|---|---|---|---|---|"]
    for model, c in reference.items():
        host = REFERENCE_MODELS[model][2]
        lines.append(f"| {model} | {c['params'] / 1e6:.0f} M | {c['lora_params'] / 1e6:.1f} M | "
                     f"{c['activations'] / 1e6:.0f} M | {4 * sum(host.values()) / 1e9:.1f} GB |")
    lines += ["", "Assumptions: latents and text embeddings are cached (`prepare`), and the pipeline (text "
              "encoders, VAE) stays on the host: fewstep's `load_teacher` loads it on the CPU and only the "
              "networks of the `TrainState` move to the GPU, so they are not in the GPU column (the host needs them, "
              "plus for consistency the pipeline's own float32 UNet). Weights, gradients and AdamW states are exact "
              "(bytes per parameter from the code, checked against the census above). Activations are `beta` from "
              "the tiny CPU runs x 4 A x batch x 0.5: bf16 mixed precision on a GPU stores roughly half the CPU's "
              "float32 activations (an assumption; norms and softmax statistics stay float32), and attention runs "
              "memory-efficient SDPA (no stored `L x L` score matrix; the tiny runs' 1024-token attention is "
              "within `beta`). Plus 1 GiB of CUDA context and allocator slack. No 8-bit optimizer, no "
              "DeepSpeed / FSDP sharding, one GPU. GB = 1e9 bytes. Fits: `24` = fits a 24 GB GPU, `80` = fits an "
              "80 GB one only, `no` = fits neither.", ""]
    lines += _could_be_cut(reference)
    rows = table(betas, reference)
    lines += ["| model | setting | weights+grads+AdamW+slack (GB) | batch 1 | batch 4 | batch 16 |", "|---|---|---|---|---|---|"]
    for row in rows:
        cells = " | ".join(f"{gb:.1f} ({fits_in(gb)})" for gb in row["gb"])
        lines.append(f"| {row['model']} | {row['setting']} | {row['fixed_gb']:.1f} | {cells} |")
    return "\n".join(lines) + "\n"


def _what_is_held() -> list[str]:
    return ["## What each method holds (read from the code)", "",
            "P = UNet parameters, L = LoRA parameters, fd = bytes of `train.frozen_dtype` (4 or 2). Device bytes:", "",
            "| method | teacher | student / generator | fake score | EMA (`ema_decay` > 0) | PD `previous` | "
            "trainable (AdamW: 8 B each; grads 4 B of one network) |",
            "|---|---|---|---|---|---|---|",
            "| progressive | P fd | 4 (P + L) | - | 4 (P + L) | (P + L) fd | P or L |",
            "| consistency | P fd | 4 (P + L) | - | 4 (P + L) | - | P or L |",
            "| fdistill | P fd | 4 (P + L) | 4 (P + L) | 4 (P + L) | - | 2 x (P or L) |",
            "| sim | P fd | 4 (P + L) | 4 (P + L) | 4 (P + L) | - | 2 x (P or L) |", "",
            "(L = 0 for full students.) Facts from the code behind it: `TrainState` casts only frozen networks to "
            "`frozen_dtype`, so a LoRA student's frozen base weights stay float32 inside the trainable copy; the EMA "
            "(`_frozen_copy`) deep-copies the whole network, a LoRA student's base included; critics (fake score, "
            "discriminator) get no EMA (`run._matching`); `lora.fake` defaults to true when `rank > 0`; "
            "progressive's `previous` is created in `__init__` and held from round 0, where it is unused; "
            "consistency held a deep copy of the teacher when these runs were measured, leaving the pipeline's float32 UNet on the host (no longer: it holds the pipeline's UNet, as the other methods do); gradients are "
            "freed (`zero_grad(set_to_none=True)`) after each network's update, so one network's are alive at "
            "a time. Activations held at once: progressive, consistency and fdistill back-propagate through one "
            "network per update (the critic's update finishes before the generator's forward); sim's generator "
            "loss back-propagates through the teacher and the fake score (to their inputs) as well as the "
            "generator, three graphs at once, and checkpointing applies to trainable networks only "
            "(`enable_gradient_checkpointing` on the student and the fake score), not to the teacher.", ""]


def _could_be_cut(reference: dict) -> list[str]:
    """Memory the code spends that a change elsewhere could save (reported, not changed here)."""
    sd = reference.get("SD 1.5")
    if sd is None:
        return []
    P, L = sd["params"], sd["lora_params"]
    lora_sim = held_model(Setting("sim", LORA_RANK, "bfloat16"), P, L)["weights"]
    shared = 2 * P + 4 * 4 * L  # one bf16 base (the teacher's) + float32 LoRA factors of generator, fake, EMA
    return ["## Costs in the code that could be cut (found while counting; not changed here)", "",
            f"- A LoRA student is a deep copy of the teacher with float32 base weights, and so are its EMA and "
            f"a LoRA fake score: LoRA sim with a bf16 teacher holds {lora_sim / 1e9:.1f} GB of weights on SD 1.5, "
            f"four copies of the same frozen base. Sharing the teacher's base (or casting the frozen base to "
            f"`frozen_dtype`) and keeping the EMA of the LoRA factors only would hold about {shared / 1e9:.1f} GB.",
            f"- Progressive distillation creates `previous` (the next rounds' teacher, {P * 2 / 1e9:.1f}-"
            f"{P * 4 / 1e9:.1f} GB on SD 1.5) in `__init__`; round 0 never calls it, and from round 1 on the "
            "original teacher is never called: one frozen network would do at any time.",
            f"- (Fixed since: consistency now holds the pipeline's UNet itself.) Consistency deep-copied the teacher, so the pipeline's own float32 UNet stayed on the host "
            f"({4 * P / 1e9:.1f} GB of host RAM on SD 1.5, {4 * reference['SDXL']['params'] / 1e9:.1f} GB on "
            "SDXL); the other methods use the pipeline's UNet itself." if "SDXL" in reference else "",
            "- Every checkpoint stores the frozen networks too (`TrainState.state_dict` saves every module: "
            "the teacher, PD's `previous`), so each checkpoint carries a teacher-sized copy on disk.",
            "- The pipeline's text encoder(s) and VAE stay in host memory for the whole run although the data "
            "are encoded once before training (host RAM, not GPU memory).", ""]


def reference_counts() -> dict:
    return {name: unet_counts(config, LORA_RANK, text_len) for name, (config, text_len, _) in REFERENCE_MODELS.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one width, two methods (a couple of minutes)")
    parser.add_argument("--out", default="docs/memory.md", help="the report; its cache is OUT with .json (shared "
                                                                 "by --quick and the full grid)")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from the cache")
    parser.add_argument("--work", default="outputs/distill_memory", help="teachers, data and run folders")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    out = Path(args.out)
    out = out if out.is_absolute() else ROOT / out
    work = Path(args.work) if Path(args.work).is_absolute() else ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = QUICK if args.quick else FULL
    command = "python benchmarks/distill_memory.py" + (" --quick" if args.quick else "")
    counts_by_width = {w: unet_counts(tiny_unet_config(w)) for w in plan["widths"]}
    reference = reference_counts()

    def write(results):
        done = {k: r for k, r in results.items() if r["width"] in counts_by_width}
        planned = len(grid(FULL))
        out.write_text(report(done, counts_by_width, reference, command, f"{len(done)} of the full grid's {planned} "
                                                                         "configurations measured"))

    cache = out.with_suffix(".json")
    if args.report:
        results = json.loads(cache.read_text()) if cache.is_file() else {}
    else:
        results = measure(plan, work, cache, on_result=write)
    write(results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
