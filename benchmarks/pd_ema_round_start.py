"""`python benchmarks/pd_ema_round_start.py`: Round-1 start with an EMA on the committed teacher: the loss of round 1's first batch for the student
today (raw weights, teacher = EMA) and with the fix (student = teacher = EMA).
configs/distill/progressive_fmnist.yaml with start_steps 4 (rounds: 2, 1 steps), ema_decay 0.99, round 0 = 100 steps."""
import tempfile
import torch
from fewstep.config import DistillConfig, load
from fewstep.distill.core import fit
from fewstep.distill.run import _load_teacher, _conditioning, _method, core_settings
from fewstep.distill.prepare import prepare_data

torch.set_num_threads(1)
out = tempfile.mkdtemp()
cfg = load(DistillConfig, "configs/distill/progressive_fmnist.yaml",
           ["progressive.start_steps=4", "train.steps=200", "train.ema_decay=0.99", f"train.output_dir={out}",
            "train.checkpoint_every=1000", "train.progress=false", "train.log_every=50"])
family = _load_teacher(cfg.teacher)
core, optim = core_settings(cfg.train, cfg.progressive.anneal)
method = _method(cfg, family, _conditioning(cfg, family), optim, None)
data = prepare_data(family, cfg, True, None)
state = fit(method, core, data, max_steps=100).state
assert (state.round, state.step_in_round) == (1, 0)
g = torch.Generator().manual_seed(1)
idx = torch.randint(0, len(data), (256,), generator=g)
x = torch.stack([data[int(i)]["x"] for i in idx])
index = torch.randint(0, 1, (256,), generator=g)
noise = torch.randn(x.shape, generator=g)
ema, raw = state.ema("student"), state.unwrapped("student")
with torch.no_grad():
    today = method.loss(x, index, noise, 1, student=raw, teacher=ema).mean()
    fixed = method.loss(x, index, noise, 1, student=ema, teacher=ema).mean()
    ema_vs_raw = method.loss(x, index, noise, 1, student=raw, teacher=raw).mean()
print(f"round 1 start, 1-step student of the 2-step teacher: loss today (raw student, EMA teacher) {today:.5g}; "
      f"with the reset (student = EMA) {fixed:.5g}; ratio {today / fixed:.2f}x")
