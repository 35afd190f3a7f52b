"""ztgate: a zero-trust inference gateway in front of untrusted Triton nodes."""

__version__ = "0.1.0"
