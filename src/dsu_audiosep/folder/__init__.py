"""Folder runs: many files, one or more queries each (``dsu-audiosep separate INPUT... --out-dir``).

``plan`` decides what runs (inputs, output names, what is skipped, the manifest) and runs one
planned file on a loaded model; ``local`` is the loop on this machine with its progress display.
A cluster runner reuses ``plan`` and calls ``run_file_job`` where the model lives.
"""
