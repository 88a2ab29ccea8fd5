"""Theory models of model collapse (Shumailov et al., Nature 2024, Sec. 3 and Supplementary):
recursive re-estimation of a discrete distribution (`discrete`) and of a Gaussian (`gaussian`),
batched over chains, with closed-form expectations (`analytic`), exact vectorised samplers
(`samplers`) and figures (`figures`); `simulate` runs through the one generational loop.

Public API (DESIGN.md): `gaussian.simulate(...)` -> `.mean [G+1, R, d]`, `.cov [G+1, R, d, d]`;
`discrete.simulate(...)` -> `.probs [G+1, R, K]`.
"""
