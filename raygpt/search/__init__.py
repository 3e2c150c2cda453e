"""Search: the search file, Ray Tune over the trainer, and the analysis of an experiment."""
