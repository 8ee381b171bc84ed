"""Progressive distillation of an exact rectified-flow teacher down to one step (issue "Distil the user's own
teacher II": the exact testbed under the flow schedule).

The teacher is the closed-form denoiser of a 1-D two-mode Gaussian mixture on the flow path
``x_t = (1 - t) x0 + t eps`` (``FlowNoise``: the student grids are ``shift(1 - i / n)``, SD3's shift 3 by
default). A small MLP student predicting the velocity is distilled 16 -> 8 -> 4 -> 2 -> 1 steps with
``ProgressiveDistillation`` on the training core; each round's student is scored by W1 to the data beside the
teacher's own Euler (= DDIM on this path) and DPM-Solver++ 2M at the same NFE, on the same noise.

    python benchmarks/flow_testbed_students.py [--updates 1500] [--shift 3]
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from torch import nn

from fewstep.distill.core import CoreConfig, OptimizerConfig, fit
from fewstep.distill.noise import FlowNoise
from fewstep.distill.progressive import ProgressiveDistillation
from fewstep.distill.students import student_sampler
from fewstep.samplers import ModelDenoiser, Sampler
from fewstep.samplers.timesteps import ExplicitTimesteps
from fewstep.testbed import ExactDenoiser, GaussianMixture

MIXTURE = GaussianMixture(torch.tensor([[-2.0], [2.0]]), 0.25)


class FlowMLP(nn.Module):
    """A small MLP on ``(x, t)`` (flow time in [0, 1])."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 1))

    def forward(self, x, t):
        return self.net(torch.cat([x, t.float().reshape(-1, 1).expand(len(x), 1)], 1))


class MixtureData(torch.utils.data.Dataset):
    def __init__(self, n: int = 4096):
        self.x = MIXTURE.sample(n, torch.Generator().manual_seed(1)).float()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def w1_to_data(samples: torch.Tensor) -> float:
    data = MIXTURE.sample(len(samples), torch.Generator().manual_seed(9)).float()
    return float((samples.flatten().sort().values - data.flatten().sort().values).abs().mean())


def pd_chain_on_exact_flow(workdir, updates_per_round: int = 1500, shift: float = 3.0, start_steps: int = 16,
                           samples: int = 4000) -> dict[int, dict]:
    """``{steps: {"student": W1, "euler": W1, "dpmpp_2m": W1}}`` for each PD round's student."""
    noise = FlowNoise(num_train_timesteps=1, shift=shift)  # called at flow time t (the MLP's input)
    teacher = ExactDenoiser(MIXTURE, noise.schedule)
    students: dict[int, tuple] = {}

    def keep(steps, module, grid, state):
        students[steps] = (copy.deepcopy(module), grid)

    rounds = start_steps.bit_length() - 1
    torch.manual_seed(0)
    method = ProgressiveDistillation(teacher, "x0", noise.schedule, start_steps=start_steps, end_steps=1,
                                     prediction_type="flow_prediction", student=FlowMLP(), on_student=keep,
                                     optim=OptimizerConfig(lr=2e-3, anneal="linear"), noise=noise)
    steps = rounds * updates_per_round
    config = CoreConfig(output_dir=str(workdir), steps=steps, batch_size=512, seed=0, checkpoint_every=steps,
                        log_every=steps, progress=False, cpu=True)
    result = fit(method, config, MixtureData(), log=lambda *_: None)
    keep(*method.final_student(result.state))
    z = torch.randn(samples, 1, generator=torch.Generator().manual_seed(2))
    rows = {}
    for n, (module, grid) in sorted(students.items()):
        student = student_sampler(ModelDenoiser(module, noise.schedule, "flow_prediction"), grid).sample(z)
        times = ExplicitTimesteps(grid.t[:-1].tolist())
        euler = Sampler(teacher, "ddim", steps=n, timesteps=times).sample(z.double()).float()
        dpmpp = Sampler(teacher, "dpmpp_2m", steps=n, timesteps=times).sample(z.double()).float()
        rows[n] = {"student": w1_to_data(student), "euler": w1_to_data(euler), "dpmpp_2m": w1_to_data(dpmpp)}
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=1500, help="optimizer steps per PD round")
    parser.add_argument("--shift", type=float, default=3.0, help="the flow scheduler's shift (SD3: 3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = pd_chain_on_exact_flow(tmp, args.updates, args.shift)
    print(f"PD on an exact rectified-flow teacher (shift {args.shift}, {args.updates} updates per round): "
          "W1 to data, same noise, same grid")
    print("| NFE | PD student | teacher Euler | teacher DPM-Solver++ 2M |\n|---|---|---|---|")
    for n, row in sorted(rows.items()):
        print(f"| {n} | {row['student']:.3f} | {row['euler']:.3f} | {row['dpmpp_2m']:.3f} |")


if __name__ == "__main__":
    main()
