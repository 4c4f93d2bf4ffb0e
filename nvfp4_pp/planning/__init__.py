"""The stage planner: per-rank memory budgets, a stage's predicted peak, and the split of layers over ranks.

Pure functions of measured facts and safetensors headers: no weight is read, no device touched.
"""
