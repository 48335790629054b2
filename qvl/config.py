"""Configuration dataclasses that check themselves: the one source of every default.

  ServerLimits   per-request limits of the HTTP server (qvl serve)

Knows nothing about torch, models or HTTP.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerLimits:
    max_images_per_request: int = 16
    max_videos_per_request: int = 2
    max_visual_tokens_per_request: int | None = None   # None: only the context bounds it
    max_request_bytes: int = 64 * 1024 * 1024
    preprocess_workers: int = 4
