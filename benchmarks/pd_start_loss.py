"""`python benchmarks/pd_start_loss.py [BATCHES]` (default 4): Initial PD loss on the committed teacher (teachers/fmnist), round 0 of configs/distill/progressive_fmnist.yaml
(32 -> 16 steps), the same batch, steps and noise for every start."""
import sys
import torch
from fewstep.config import DistillConfig, load
from fewstep.distill.run import _load_teacher, _conditioning, _method, core_settings
from fewstep.distill.prepare import prepare_data

torch.set_num_threads(1)
batches, bs = int(sys.argv[1]) if len(sys.argv) > 1 else 4, 64
out = {}
for ptype in ("v_prediction", "sample", "teacher"):
    cfg = load(DistillConfig, "configs/distill/progressive_fmnist.yaml", [f"progressive.prediction_type={ptype}", "progressive.end_steps=16"])
    family = _load_teacher(cfg.teacher)
    cond = _conditioning(cfg, family)
    core, optim = core_settings(cfg.train, cfg.progressive.anneal)
    method = _method(cfg, family, cond, optim, None)
    data = prepare_data(family, cfg, True, None)
    g = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for b in range(batches):
            idx = torch.randint(0, len(data), (bs,), generator=g)
            x = torch.stack([data[int(i)]["x"] for i in idx])
            n = method.teacher_grid(0).n_steps // 2
            index = torch.randint(0, n, (bs,), generator=g)
            noise = torch.randn(x.shape, generator=g)
            losses.append(method.loss(x, index, noise, 0))
    loss = torch.cat(losses)
    out[ptype] = loss
    print(f"{ptype:>12} (student {method.prediction_type}, starts_as_teacher={method.starts_as_teacher}): "
          f"mean loss {loss.mean():.5g} over {len(loss)} examples (median {loss.median():.3g})", flush=True)
print(f"today's v start / matched start: {out['v_prediction'].mean() / out['teacher'].mean():.1f}x")
print(f"x start / matched start: {out['sample'].mean() / out['teacher'].mean():.1f}x")
