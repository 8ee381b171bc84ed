"""fewstep.eval: the FID harness that scores samplers (swept over NFE) and students alike. Built by later
issues."""
