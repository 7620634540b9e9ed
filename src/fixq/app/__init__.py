"""The ``fixq`` command: entry point and error reporting (``cli``), argument parsing
(``parser``), the sub-commands (``commands*``) and their shared helpers (``common``), the
paper presets (``paper``), HTML report and plots. The only package that prints for the
user; may import every other package, none imports it."""
