"""`evomerge export`: a finished study's chosen trial as a model folder ready to publish.

run (the command: recipe.yaml, checkpoint, card, plots, trials.csv), info (what export reads
from the study records), card (the model card), plots, provenance (versions, source hashes),
verify (the checkpoint against the scored candidate), hub (upload). Export reads the study
(search) and writes with the merge engine; it never imports the search loop.
"""
