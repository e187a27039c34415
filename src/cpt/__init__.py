"""cpt: continued pretraining of open language models on unlabeled domain text."""
__version__ = "0.1.0"
