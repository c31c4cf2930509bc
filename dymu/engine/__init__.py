"""The merging engine: pure tensor functions and the block step.

``merge`` matches and merges (bipartite scores, the threshold, batch and fixed-r rules, the
packing of images of different lengths; it imports nothing of ours), ``attention`` attends
over packed images, ``blocks`` runs one tower block with merging through a tower adapter,
``schedule`` spreads a token budget over blocks. Used by the encoder, calibration and ToMe
mode alike.
"""
