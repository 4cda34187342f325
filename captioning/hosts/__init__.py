"""Per-host politeness for a whole job: the host ledger, the fetch-side gate, robots.txt."""
