"""ldm_jax: Latent Diffusion Models (Rombach et al., CVPR 2022) in JAX/Flax.

The top level holds only the command-line entry points (`python -m ldm_jax.train`, ...);
the library lives in subpackages, one concern each (docs/architecture.md has the map).
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake in what the user asked for (a config field, a flag, a path, a checkpoint, the
    data), as opposed to a bug. The message names the field or flag at fault and the fix.

    Every entry point reports these as one line on stderr and exits with status 2
    (`ldm_jax.cli.runner.run_command`); any other exception keeps its traceback. Subclasses
    usually also derive from ValueError / FileNotFoundError / RuntimeError so library callers
    can catch them by their everyday type.
    """
