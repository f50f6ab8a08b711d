"""The UNTRAINED demo model, for people (and tests) without the released weights.

weights.py      the deterministic synthetic weight scheme (seeded by key name)
model_files.py  those weights written in the released file formats (checkpoint, CLAP, roberta folder)
command.py      ``dsu-audiosep demo``: the model files plus a mixture, and the worker commands to run
"""
