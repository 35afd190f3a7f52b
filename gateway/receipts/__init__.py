"""Signed receipts for every answer and denial, in an append-only transparency log.

- `commit`:    salted tensor commitments (`commit_tensor`, `new_salt`)
- `model`:     the `Receipt` and its signed envelope `SignedReceipt` (RFC 8785 JSON)
- `signing`:   `Signer`, the published `KeySet` with validity windows, `Verdict`
- `merkle`:    RFC 9162 trees, inclusion and consistency proofs
- `note`:      C2SP signed notes, checkpoints, cosignatures
- `log`:       `ReceiptLog`: group-committed SQLite log, checkpoints, frozen-log detection
- `issue`:     `issue` (what the gateway's receipt stage calls), `summary`, `DenialCoalescer`
- `checkpointer`: signs checkpoints on a timer; `WitnessClient`s get each new one cosigned
- `witness`:   the C2SP tlog-witness server (a process of its own)
- `http`:      `log_routes`: GET /log, checkpoint, inclusion, consistency
- `bundle`, `verify`: offline audit bundles and their verification (`ztgate verify`)

`docs/compliance.md` is the guide for auditors and data-protection officers.
"""
