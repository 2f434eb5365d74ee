"""Outbound media: fetching http(s) and ``data:`` URLs and reading uploads, behind the address guard.

Plain library code (no FastAPI, no torch): every failure is a ``MediaError`` with a 4xx status.
"""

from .fetch import FetchedMedia, decode_data_url, fetch_url, read_upload, sniff_media_kind
from .netguard import MediaError, MediaPolicy, check_address

__all__ = ["FetchedMedia", "MediaError", "MediaPolicy", "check_address", "decode_data_url", "fetch_url",
           "read_upload", "sniff_media_kind"]
