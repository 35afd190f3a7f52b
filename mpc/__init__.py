"""CrypTen MPC inference: party workers and the gateway-side coordinator."""
