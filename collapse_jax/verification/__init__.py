"""Verification of synthetic labels (Feng et al. 2024, "Beyond model collapse: scaling up with
synthesized data requires verification"; `kind: verification`): `learner` (config, closed forms
and `VerificationLearner`) and `figures` (the closed-form curves of its runs and the phase
diagram over the verifier's accuracies)."""
