"""kit: recipes, a fast training engine, ensembles with TTA and reports for CIFAR-style competitions."""

__version__ = "0.4.0"
