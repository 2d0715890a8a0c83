"""The declared passes the conductor runs, one module each (the contract is in base.py)."""
