"""One exception type with a stable machine-readable code.

Every failure a user can cause is raised as ``AudioSepError(code, message)``; the worker turns it
into ``{"status": "error", "code": ..., "message": ...}``. Codes are part of the protocol: add new
ones, never rename.
"""
from __future__ import annotations


class AudioSepError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


# Stable error codes (protocol extension "code").
INVALID_JSON = "invalid_json"            # line is not JSON / not UTF-8 / too long
INVALID_COMMAND = "invalid_command"      # JSON but not an object, or no "cmd"
UNKNOWN_COMMAND = "unknown_command"
INVALID_FIELD = "invalid_field"          # wrong type or value of a field
MISSING_FIELD = "missing_field"
FILE_NOT_FOUND = "file_not_found"
PERMISSION_DENIED = "permission_denied"
INVALID_AUDIO = "invalid_audio"          # unreadable, corrupt, empty audio
INVALID_TEXT = "invalid_text"
INVALID_CHECKPOINT = "invalid_checkpoint"  # wrong kind, truncated, missing keys, wrong shapes
UNSAFE_CHECKPOINT = "unsafe_checkpoint"    # pickle wants to run code
INVALID_CONFIG = "invalid_config"
DEVICE_UNAVAILABLE = "device_unavailable"
MODEL_NOT_LOADED = "model_not_loaded"
OUTPUT_ERROR = "output_error"            # cannot write the output (folder, permission, same as input)
DUPLICATE_OUTPUT = "duplicate_output"    # two queries or jobs of one command write the same file
DISK_FULL = "disk_full"
OUT_OF_MEMORY = "out_of_memory"
CANCELLED = "cancelled"
INVALID_QUERY = "invalid_query"          # query_audio list empty, span outside the file, bad query_embedding
NO_AUDIO_BRANCH = "no_audio_branch"      # audio query, but the checkpoint / converted folder lacks the CLAP audio branch
INTERNAL_ERROR = "internal_error"
WORKER_LOST = "worker_lost"              # a cluster run's actor died on this file past its retries
