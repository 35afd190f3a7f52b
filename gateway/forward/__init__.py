"""Edge -> core forwarding without a confused deputy (docs/ddil.md, "Forwarding to the core").

An edge site whose own nodes cannot serve a request (an inference or a generation:
`paths.py`) may send it to its core. The core
must not become the edge's deputy: it answers only what the client itself may ask, under
the core's own policy and revocations, and only for sites policy lets act for that
client (`forward_for`). So the edge calls a separate listener with a per-site forwarder
certificate, and signs a statement (`statement.py`) binding the client's certificate, the
body, the model, a nonce, the time, the core as audience and the hops so far; the core
(`listener.py`) checks every part of it before the request enters its ordinary pipeline
as the client. `client.py` is the edge's half; `site.py` carries what the receipt says
about which site answered and why.
"""
