"""`evomerge zoo`: the tiny offline model zoo (a base and one expert per task), trained on CPU.

tasks (the synthetic tasks and their eval records), tokenizer (the zoo's byte-level BPE),
training (batches, the optimizer loop, the curricula), build (settings, the resumable build and
the command), evaluate (quick greedy scoring of a zoo model, for reports and tests).
"""
