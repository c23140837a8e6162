"""sam3lora's Hydra configs. In the wheel this directory is the package ``sam3lora.conf`` (see pyproject.toml);
the CLIs load it as ``pkg://sam3lora.conf``, which Hydra only accepts for a package with an ``__init__.py``."""
