"""dsu-audiosep: text-queried sound separation (AudioSep) as a fast, robust runtime.

Imports here stay light: the worker prints its first protocol line before torch is imported.
"""
__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = ["__version__", "PROTOCOL_VERSION", "Separator", "build_audiosep", "separate_audio", "embed_query"]


def __getattr__(name):  # lazy: keep `import dsu_audiosep` free of torch
    if name == "Separator":
        from . import api
        return api.Separator
    if name in ("build_audiosep", "separate_audio", "embed_query"):
        from . import seed_api
        return getattr(seed_api, name)
    raise AttributeError(name)
