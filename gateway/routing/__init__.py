"""Routing over untrusted nodes: node clients, selection, health and ejection, retries."""
