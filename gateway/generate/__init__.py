"""Generative models through the same zero-trust path: Triton's generate extension and an
OpenAI-compatible surface, token policy, and receipts around every stream.

    ask.py      request bodies (OpenAI chat/completions, Triton generate) -> `Ask`
    meter.py    tokens per minute and token budgets per identity, in the shared store
    session.py  the pipeline for one generation: policy, limits, node, receipts
    opening.py  opening receipts written while the node's first token is on its way
    stop.py     stop sequences, matched on the tokens before they are delivered
    wire.py     how events look on each surface (JSON, server-sent events)
    sse.py      the event-stream response: send timeouts, disconnects cancel at the node
    routes.py   the HTTP routes (gateway/app.py mounts them)
"""
