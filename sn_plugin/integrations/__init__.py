"""Toolkit adapters. Each imports its toolkit when it is imported, never before.

- :mod:`sn_plugin.integrations.openmmlab`: SN norm types, hooks and an optimizer
  constructor for mmengine-based toolkits (MMDetection, MMSegmentation,
  MMAction2, MMPretrain); name it in a config's ``custom_imports``.
- :mod:`sn_plugin.integrations.detectron2`: ``NORM: "SN"`` in detectron2, config
  keys, hooks, ``SNTrainer`` and the training command.
- :mod:`sn_plugin.integrations.common`: what both share (no toolkit imported).

docs/architecture.md lists every change they make to a toolkit's internals.
"""
