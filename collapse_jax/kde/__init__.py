"""Recursive Gaussian kernel density estimation (`kind: kde`): `learner` (config, the KDE, the real
distributions and `KDELearner`) and `figures` (density plots and the closed-form variance)."""
