"""One package per study, each with `run(config, workdir)` and `render(workdir)`, and what they share (`common`).

  robustify   study 2: gradient attacks on a 3D U-Net and two defences (distillation, adversarial training)
  poison      study 1: synthetic-data poisoning of U-Net training with a SANTA-style translation GAN
  deform      study 3: learned deformation-and-appearance attack (per case and generator), augmentation defence
  unlearnable study 4: unlearnable examples (min-min, UMed): protect -> train a fresh victim -> clean test

`common` holds the parts every study repeats: the workdir (config check, then config.json), the progress line and
cached stages (the evaluation cells are `mri_poison.cellstore`, a layer below).

`render` writes any finished workdir's report.md again from its result files (which study: from its config.json).
The main job (`reproduce`) runs the four as stages into one workdir and one report.

Subpackages are not imported here: `import mri_poison.studies.robustify` pulls in only what that study needs.
"""
