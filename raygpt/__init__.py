"""raygpt: pre-train GPT-style language models on a Ray cluster.

"The recipe" in this package's comments is the training recipe stated in docs/recipe.md: GPT-2's
architecture, the warmup + cosine schedule, clipping after warmup, AdamW, the evaluation and the
resume guarantee, with where raygpt departs from the code it comes from and why.
"""

__version__ = "0.1.0"
