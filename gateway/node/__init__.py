"""Node side: what runs next to (or inside) a Triton inference server."""
