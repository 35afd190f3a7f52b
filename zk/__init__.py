"""Zero-knowledge proofs of inference (ezkl): onboarding, node-side prover, verifier."""
