"""Training stage: TorchTitan recipes, the Megatron-data dataloader, CPU workarounds,
the torchrun launcher and the ``titanenv train`` / ``titanenv evaluate`` commands.

Submodules are imported on demand; importing this package does not import torch.

- :mod:`titanenv.train.dataloader`: ``MegatronDataloader`` (TorchTitan dataloader over ``.bin/.idx``).
- :mod:`titanenv.train.recipes`: config functions ``titanenv_debug``, ``titanenv_1b``.
- :mod:`titanenv.train.cpu`: the documented CPU/gloo workarounds.
- :mod:`titanenv.train.launch`: pure functions that build the ``torchrun`` command.
- :mod:`titanenv.train.settings`: the one table of training flags (``TrainArgs``, ``SubmitArgs``).
- :mod:`titanenv.train.job` / :mod:`titanenv.train.runner`: one node's run (preflight, provenance, torchrun, exit code).
- :mod:`titanenv.train.preflight`: the checks every node passes before torchrun.
- :mod:`titanenv.train.provenance`: what was launched, recorded in the run folder.
- :mod:`titanenv.train.checkpoints` / :mod:`titanenv.train.checkpointer`: complete checkpoints only.
- :mod:`titanenv.train.exitcodes`: 0 done, 3 preflight failed, 75 stopped for requeue.
- :mod:`titanenv.train.cli`: ``train`` and ``evaluate`` command functions.
"""
