"""The merging engine: pure tensor functions and the block step.

``merge`` matches and merges (bipartite scores, the threshold, batch and fixed-r rules, the
new order of every image; it imports nothing of ours but ``packing``), ``packing`` says where
each image's tokens sit in a packed tensor (and makes host-side indices and constants),
``attention`` attends over packed images, ``deferred`` reads new lengths blocks later,
``blocks`` runs one tower block with merging through a tower adapter, ``schedule`` spreads a
token budget over blocks. Used by the encoder, calibration and ToMe mode alike.
"""
