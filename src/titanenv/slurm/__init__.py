"""Slurm side of the stages: the sbatch templates and their rendering, and submission.

Modules: :mod:`~titanenv.slurm.render` (Jinja2 templates plus site data),
:mod:`~titanenv.slurm.submit` (``titanenv train --submit [--dry-run]``). The checks on every
node before torchrun (:mod:`titanenv.train.preflight`) and the launch record
(:mod:`titanenv.train.provenance`) run inside ``titanenv train``, so they live in the train stage.
Stopping at the time limit and requeueing are split between the template (signal, stop
file, ``scontrol requeue``) and :mod:`titanenv.train.control` (agreement, checkpoint).
"""
