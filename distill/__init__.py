"""fewstep.distill: trainers that distill a teacher into few-step students (progressive distillation,
f-distill, SIM, multistep consistency), exposed through the samplers' interface. Built by later issues."""
