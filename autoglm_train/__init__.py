"""autoglm_train: image-text dual encoders trained with contrastive objectives, from a CPU to a cluster."""

from omegaconf import OmegaConf

from autoglm_train.distributed.slurm import register_resolvers
from autoglm_train.utils.hardware import cpu_precision

# the configs name these resolvers (the run directory, Slurm task counts, the CPU's precision); composing
# needs them first
register_resolvers()
OmegaConf.register_new_resolver("cpu_precision", cpu_precision, use_cache=True, replace=True)
