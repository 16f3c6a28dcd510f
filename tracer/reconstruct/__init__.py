"""The reconstruction engine: hop events → packets → verdicts (per packet, per flow)."""
