"""Independent decoders of written checkpoints and their quality (perplexity, KL vs the BF16 source).

`python -m nvfp4_pp.evaluate`. Nothing here imports the code that writes checkpoints.
"""
