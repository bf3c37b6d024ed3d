"""The names a patched pipeline's options take, apart from the code that acts on them: the
command line builds its parser from these without importing torch."""

MODES = ("final", "per_step", "per_step_eps", "strip")
COMPOSITES = (None, "pixel")
OUTPUT_CHECKS = ("flag", "raise", "off")
