"""The bundled YAML recipes. Installed, this folder is the package `optimum_dfq.recipes` (pyproject.toml maps it), so
that a wheel ships the recipes and `DFQConfig.from_yaml("sardfq_w4a4")` finds one by name; it holds no code."""
