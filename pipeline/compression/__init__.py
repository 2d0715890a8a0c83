"""Structural compression: pruning, low-rank factorization, and the recovery that follows them.

prune.py and factorize.py change a model's structure (factorize.py also
measures each layer's sensitivity to it); units.py finds what can be pruned
and to which branch it belongs; measure.py counts params and MACs per branch;
structure.py records what a stage changed so a compressed model rebuilds from
model.json; sensitivity.py measures and allocates pruning per unit;
depth.py drops whole text layers; recalibrate.py re-estimates stale
BatchNorms; recovery.py distills the compressed model back towards the source.
The passes in pipeline/stages/ compose them.
"""
