"""autoglm_train: image-text dual encoders trained with contrastive objectives, from a CPU to a cluster."""

from autoglm_train.distributed.slurm import register_resolvers

# the configs name these resolvers (the run directory, Slurm task counts); composing needs them first
register_resolvers()
