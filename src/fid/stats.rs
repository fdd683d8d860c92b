//! Fréchet Inception Distance and Kernel Inception Distance from feature vectors, in f64.
//!
//! FID is pytorch-fid's `calculate_frechet_distance`: |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2)
//! with np.cov's unbiased covariance. tr sqrtm(S1 S2) is computed as the sum of square roots of the
//! eigenvalues of the symmetric matrix sqrt(S1) S2 sqrt(S1), which has the eigenvalues of S1 S2;
//! symmetric eigensolvers are stable where scipy's Schur-based sqrtm of the non-symmetric product
//! is not. Eigenvalues that rounding makes slightly negative (singular covariances, n <= d)
//! contribute 0, as the imaginary roots scipy returns contribute nothing to the real part
//! pytorch-fid keeps. If the result is not finite, pytorch-fid's fallback is taken: 1e-6 is added
//! to both diagonals.
//!
//! A number is reported only if it is valid: statistics holding NaN or infinity, or a sigma that
//! is not a covariance matrix (not symmetric, or with a negative eigenvalue beyond rounding), are
//! errors, where pytorch-fid raises (scipy refuses NaN; an indefinite product leaves an imaginary
//! diagonal, "Imaginary component") or, for an asymmetric sigma, silently computes something
//! that depends on which side is transposed.
//!
//! KID is torch-fidelity's: polynomial kernel k(x, y) = (x.y / d + 1)^3, unbiased MMD^2 averaged
//! over 100 subsets of m = min(1000, n_a, n_b) features drawn without replacement (seeded); with
//! m = n_a = n_b every subset holds all features, so the value is exact and the spread 0.

use anyhow::{anyhow, bail, Result};
use nalgebra::{DMatrix, SymmetricEigen};
use rand::SeedableRng;

/// torch-fidelity's KID defaults.
pub const KID_SUBSETS: usize = 100;
pub const KID_SUBSET_SIZE: usize = 1000;
const KID_SEED: u64 = 2020;

/// Feature statistics of one image set (pytorch-fid's `mu`, `sigma`), with the features
/// themselves when they are known (KID needs them).
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub dim: usize,
    /// Number of images, when known (.npz files of pytorch-fid do not say).
    pub n: Option<usize>,
    pub mu: Vec<f64>,
    /// Row-major [dim, dim].
    pub sigma: Vec<f64>,
    /// Row-major [rows, dim], possibly only the first rows of the set.
    pub features: Option<Vec<f32>>,
}

impl Stats {
    /// Mean and unbiased covariance (np.cov(f, rowvar=False)) of `features` [n, dim], n >= 2.
    pub fn from_features(features: Vec<f32>, dim: usize) -> Result<Stats> {
        assert!(dim > 0 && features.len().is_multiple_of(dim), "features must be [n, {dim}]");
        let n = features.len() / dim;
        if n < 2 {
            bail!("FID needs at least 2 images per set (a covariance of {n} image is undefined), got {n}");
        }
        if let Some(i) = features.iter().position(|v| !v.is_finite()) {
            bail!(
                "feature {} of image {} is {}; the network produced non-finite features",
                i % dim,
                i / dim,
                features[i]
            );
        }
        let mut mu = vec![0f64; dim];
        for row in features.chunks_exact(dim) {
            for (m, &v) in mu.iter_mut().zip(row) {
                *m += v as f64;
            }
        }
        mu.iter_mut().for_each(|m| *m /= n as f64);
        // sigma = Xc^T Xc / (n - 1), accumulated over blocks of rows so the centered copy stays small.
        let mut sigma = DMatrix::<f64>::zeros(dim, dim);
        for block in features.chunks(1024 * dim) {
            let rows = block.len() / dim;
            let xc = DMatrix::from_fn(rows, dim, |r, c| block[r * dim + c] as f64 - mu[c]);
            sigma.gemm_tr(1.0, &xc, &xc, 1.0);
        }
        sigma /= (n - 1) as f64;
        // nalgebra is column-major; sigma is symmetric up to rounding, so read it as row-major
        // after making it exactly symmetric.
        let sigma = symmetrize(&sigma);
        Ok(Stats { dim, n: Some(n), mu, sigma: sigma.transpose().as_slice().to_vec(), features: Some(features) })
    }

    fn sigma_matrix(&self) -> DMatrix<f64> {
        DMatrix::from_row_slice(self.dim, self.dim, &self.sigma)
    }

    /// The cheap checks of statistics from a file: sizes agree, every value is finite, sigma is
    /// symmetric with a non-negative diagonal (what any covariance matrix is). Positive
    /// semi-definiteness is checked by [`fid`], which factors sigma anyway.
    pub fn validate(&self) -> Result<()> {
        let d = self.dim;
        if d == 0 || self.mu.len() != d || self.sigma.len() != d * d {
            bail!("statistics of dimension {d} need {d} mu values and {d}x{d} sigma values");
        }
        if let Some(i) = self.mu.iter().position(|v| !v.is_finite()) {
            bail!("'mu' holds {} at index {i}", self.mu[i]);
        }
        if let Some(i) = self.sigma.iter().position(|v| !v.is_finite()) {
            bail!("'sigma' holds {} at [{}, {}]", self.sigma[i], i / d, i % d);
        }
        let scale = (0..d).map(|i| self.sigma[i * d + i].abs()).fold(0f64, f64::max);
        for r in 0..d {
            if self.sigma[r * d + r] < 0.0 {
                bail!(
                    "'sigma' has a negative variance {} at [{r}, {r}]; not a covariance matrix",
                    self.sigma[r * d + r]
                );
            }
            for c in 0..r {
                let (a, b) = (self.sigma[r * d + c], self.sigma[c * d + r]);
                if (a - b).abs() > SYMMETRY_TOLERANCE * scale {
                    bail!("'sigma' is not symmetric ([{r}, {c}] = {a}, [{c}, {r}] = {b}); not a covariance matrix");
                }
            }
        }
        if let Some(f) = &self.features {
            if let Some(i) = f.iter().position(|v| !v.is_finite()) {
                bail!("'feats' holds {} at [{}, {}]", f[i], i / d, i % d);
            }
        }
        Ok(())
    }
}

/// Largest |s_ij - s_ji| of a covariance matrix, relative to its largest variance (rounding of
/// np.cov in f64, or of a sigma stored in f32, stays far below).
const SYMMETRY_TOLERANCE: f64 = 1e-6;
/// Most negative eigenvalue rounding can give a positive semi-definite matrix, relative to the
/// largest (singular covariances, n <= d, have eigenvalues of about -1e-13 of it in f64).
const PSD_TOLERANCE: f64 = 1e-6;

/// Err unless symmetric `s` is positive semi-definite up to rounding; `which` names it.
fn check_psd_eigenvalues(eigenvalues: &[f64], which: &str) -> Result<()> {
    let max = eigenvalues.iter().fold(0f64, |a, &l| a.max(l.abs()));
    let min = eigenvalues.iter().copied().fold(f64::INFINITY, f64::min);
    if min < -PSD_TOLERANCE * max {
        bail!(
            "{which} 'sigma' is not positive semi-definite (eigenvalue {min:.6e}, largest {max:.6e}); not a covariance \
             matrix, so no FID is defined (pytorch-fid raises 'Imaginary component')"
        );
    }
    Ok(())
}

/// Err unless `s` is positive semi-definite up to rounding (cheap when it is definite: one
/// Cholesky factorisation).
fn check_psd(s: &DMatrix<f64>, which: &str) -> Result<()> {
    if s.clone().cholesky().is_some() {
        return Ok(());
    }
    check_psd_eigenvalues(symmetrize(s).symmetric_eigenvalues().as_slice(), which)
}

fn symmetrize(m: &DMatrix<f64>) -> DMatrix<f64> {
    (m + m.transpose()) * 0.5
}

/// Square root of a symmetric positive semi-definite matrix (negative rounding eigenvalues -> 0);
/// an error if it has eigenvalues below rounding.
fn sqrt_psd(m: DMatrix<f64>, which: &str) -> Result<DMatrix<f64>> {
    let e = SymmetricEigen::new(symmetrize(&m));
    check_psd_eigenvalues(e.eigenvalues.as_slice(), which)?;
    let roots = e.eigenvalues.map(|l| l.max(0.0).sqrt());
    let scaled =
        DMatrix::from_fn(e.eigenvectors.nrows(), e.eigenvectors.ncols(), |r, c| e.eigenvectors[(r, c)] * roots[c]);
    Ok(&scaled * e.eigenvectors.transpose())
}

/// tr sqrtm(S1 S2) for symmetric PSD S1, S2: the eigenvalues of S1 S2 are those of L^T S2 L
/// when S1 = L L^T (Cholesky, for full-rank S1: one eigenvalue-only decomposition, ~3x less work
/// than two full ones at d = 2048), else of sqrt(S1) S2 sqrt(S1) (singular S1, e.g. n <= d).
fn trace_sqrt_product(s1: &DMatrix<f64>, s2: &DMatrix<f64>) -> Result<f64> {
    let m = match s1.clone().cholesky() {
        Some(c) => {
            let l = c.unpack();
            l.transpose() * s2 * l
        }
        None => {
            let r = sqrt_psd(s1.clone(), "the first set's")?;
            &r * s2 * &r
        }
    };
    Ok(symmetrize(&m).symmetric_eigenvalues().iter().map(|&l| l.max(0.0).sqrt()).sum())
}

/// FID between two sets of statistics, as pytorch-fid; an error for statistics that are not
/// valid (see the module).
pub fn fid(a: &Stats, b: &Stats) -> Result<f64> {
    if a.dim != b.dim {
        bail!("cannot compare {}-d statistics with {}-d statistics", a.dim, b.dim);
    }
    a.validate().map_err(|e| anyhow!("the first set's statistics: {e}"))?;
    b.validate().map_err(|e| anyhow!("the second set's statistics: {e}"))?;
    let (s1, s2) = (a.sigma_matrix(), b.sigma_matrix());
    // s1 is checked where the product is formed (its factorisation is needed there).
    check_psd(&s2, "the second set's")?;
    let diff: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y) * (x - y)).sum();
    let mut tr = trace_sqrt_product(&s1, &s2)?;
    if !tr.is_finite() {
        let eye = DMatrix::<f64>::identity(a.dim, a.dim) * 1e-6;
        tr = trace_sqrt_product(&(&s1 + &eye), &(&s2 + &eye))?;
    }
    let value = diff + s1.trace() + s2.trace() - 2.0 * tr;
    if !value.is_finite() {
        bail!("FID is not finite: the statistics hold NaN or infinite values");
    }
    Ok(value)
}

/// KID estimate: mean and standard deviation (numpy's, ddof 0) over the subsets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kid {
    pub mean: f64,
    pub std: f64,
    pub subsets: usize,
    pub subset_size: usize,
}

/// torch-fidelity's unbiased MMD^2 with the cubic polynomial kernel between `a` [m, d] and `b` [m, d].
fn polynomial_mmd(a: &DMatrix<f64>, b: &DMatrix<f64>) -> f64 {
    let (m, d) = (a.nrows() as f64, a.ncols() as f64);
    let kernel = |x: &DMatrix<f64>, y: &DMatrix<f64>| (x * y.transpose()).map(|v| (v / d + 1.0).powi(3));
    let (kxx, kyy, kxy) = (kernel(a, a), kernel(b, b), kernel(a, b));
    let off_diag = |k: &DMatrix<f64>| k.sum() - k.trace();
    (off_diag(&kxx) + off_diag(&kyy)) / (m * (m - 1.0)) - 2.0 * kxy.sum() / (m * m)
}

/// KID between features `a` [n_a, dim] and `b` [n_b, dim], as torch-fidelity (see the module).
pub fn kid(a: &[f32], b: &[f32], dim: usize) -> Result<Kid> {
    let (na, nb) = (a.len() / dim, b.len() / dim);
    let m = KID_SUBSET_SIZE.min(na).min(nb);
    if m < 2 {
        bail!("KID needs at least 2 images per set, got {na} and {nb}");
    }
    let take = |f: &[f32], rows: &[usize]| DMatrix::from_fn(rows.len(), dim, |r, c| f[rows[r] * dim + c] as f64);
    if m == na && m == nb {
        let all: Vec<usize> = (0..m).collect();
        let mean = polynomial_mmd(&take(a, &all), &take(b, &all));
        return finite_kid(Kid { mean, std: 0.0, subsets: 1, subset_size: m });
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(KID_SEED);
    let mut values = Vec::with_capacity(KID_SUBSETS);
    for _ in 0..KID_SUBSETS {
        let ia = rand::seq::index::sample(&mut rng, na, m).into_vec();
        let ib = rand::seq::index::sample(&mut rng, nb, m).into_vec();
        values.push(polynomial_mmd(&take(a, &ia), &take(b, &ib)));
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / values.len() as f64;
    finite_kid(Kid { mean, std: var.sqrt(), subsets: KID_SUBSETS, subset_size: m })
}

/// A KID is reported only if it is a number (features holding NaN or huge values make it none).
fn finite_kid(k: Kid) -> Result<Kid> {
    if !(k.mean.is_finite() && k.std.is_finite()) {
        bail!("KID is not finite ({}): the features hold NaN or infinite values", k.mean);
    }
    Ok(k)
}
