"""sctd-dist: distributed BERT pretraining with semantic-consistent token dropping."""
__version__ = "0.1.0"
