"""The language-model side: virtual token unmerging and the layouts that feed it.

``vtu`` patches a transformers decoder LM so that hidden states stay at merged length while
attention sees the full positions; ``layouts`` derives the VTU mapping (full position ->
merged slot) from a VLM's own arrangement of visual features, run on markers.
"""
