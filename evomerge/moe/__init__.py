"""`evomerge moe`: a mixture of experts built from dense experts (mergekit-moe's YAML format).

config (parse and validate the YAML), router (the gate rows of every layer), build (the
output config and tensors, written through the merge package's checkpoint writer).
"""
