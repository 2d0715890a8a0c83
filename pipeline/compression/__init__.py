"""Shared machinery of the structural compression stages (prune, factorize).

units.py finds what can be pruned and to which branch it belongs; measure.py
counts params and MACs per branch; structure.py records what a stage changed
so a compressed model rebuilds from model.json; sensitivity.py measures and
allocates per unit.
"""
