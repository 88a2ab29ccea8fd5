"""Recursive linear regression with a fixed design (`kind: linear_regression`): `learner` (config,
closed forms and `LinearRegressionLearner`) and `figures` (the closed-form curves of its runs)."""
