"""The training system: configs, losses, the train loop, checkpoints and provenance.

Imports `gating.layers` and `gating.data`, never `gating.study`. Needs the "train" extra
(orbax-checkpoint, datasets, tqdm); `import gating` does not import it.
"""
