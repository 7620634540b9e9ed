"""The ``fixq`` command: argument parsing (``cli``), the sub-commands (``commands*``), the
paper presets (``paper``), HTML report and plots. The only package that prints for the
user; may import every other package, none imports it."""
