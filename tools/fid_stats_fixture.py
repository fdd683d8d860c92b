#!/usr/bin/env python3
"""Expected FID/KID values for tests/fid.rs, computed exactly as pytorch-fid (scipy sqrtm with the
offset fallback) and torch-fidelity (cubic polynomial kernel, unbiased MMD^2) compute them.
Writes tests/fixtures/fid/stats.npz (random features) and expected.json. Needs numpy + scipy.
usage: python3 tools/fid_stats_fixture.py tests/fixtures/fid"""
import json, os, sys
import numpy as np
from scipy import linalg


def frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):  # pytorch-fid 0.3.0 calculate_frechet_distance
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def mmd(f1, f2):  # torch-fidelity polynomial_mmd, degree 3, gamma 1/d, coef0 1, unbiased
    d, m = f1.shape[1], f1.shape[0]
    k = lambda x, y: (x @ y.T / d + 1) ** 3
    kxx, kyy, kxy = k(f1, f1), k(f2, f2), k(f1, f2)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


out = sys.argv[1]
rng = np.random.default_rng(11)
sets = {
    # full-rank covariances (n > d), the second set shifted and stretched
    "a": rng.normal(size=(40, 16)).astype(np.float32),
    "b": (rng.normal(size=(40, 16)) * 1.3 + 0.2).astype(np.float32),
    # singular covariances (n <= d), as small FID runs on 2048-d features have
    "c": rng.normal(size=(10, 24)).astype(np.float32),
    "d": (rng.normal(size=(10, 24)) + 0.5).astype(np.float32),
}
np.savez(os.path.join(out, "features.npz"), **sets)
st = {k: (v.astype(np.float64).mean(0), np.cov(v.astype(np.float64), rowvar=False)) for k, v in sets.items()}
np.savez(os.path.join(out, "stats_a.npz"), mu=st["a"][0], sigma=st["a"][1])
exp = {
    "fid_ab": frechet(*st["a"], *st["b"]), "fid_aa": frechet(*st["a"], *st["a"]), "fid_cd": frechet(*st["c"], *st["d"]),
    "kid_ab": mmd(sets["a"].astype(np.float64), sets["b"].astype(np.float64)),
    "kid_cd": mmd(sets["c"].astype(np.float64), sets["d"].astype(np.float64)),
}
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump(exp, f, indent=1)
print(exp)
