//! `--shard K/N`: one machine's share of a large sampling job. Shares are contiguous runs of
//! global image indices, so each shard samples whole batches and names its files by global index;
//! since noise is keyed by image index, the files are those one unsharded run would write.

use std::ops::Range;

use anyhow::{bail, Result};

/// Parse `K/N` (1 <= K <= N, 1-based like Slurm's `--array=1-N`).
pub fn parse(spec: &str) -> Result<(usize, usize)> {
    let bad = |why: &str| -> Result<(usize, usize)> {
        bail!("--shard {spec}: {why}; write K/N with 1 <= K <= N, e.g. --shard 3/8 for the third of 8 shares")
    };
    let Some((k, n)) = spec.split_once('/') else { return bad("no '/'") };
    let (Ok(k), Ok(n)) = (k.trim().parse::<usize>(), n.trim().parse::<usize>()) else {
        return bad("K and N must be whole numbers");
    };
    if n == 0 {
        return bad("N must be at least 1");
    }
    if k == 0 || k > n {
        return bad(&format!("K must be between 1 and {n}"));
    }
    Ok((k, n))
}

/// Global image indices of share `k` of `shards` when `total` images are wanted: the shares are
/// contiguous, disjoint, cover 0..total in order and differ in size by at most one.
pub fn range(k: usize, shards: usize, total: usize) -> Range<usize> {
    assert!(1 <= k && k <= shards, "shard {k}/{shards}");
    let at = |i: usize| (i as u128 * total as u128 / shards as u128) as usize;
    at(k - 1)..at(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_partition_the_indices() {
        for total in [0, 1, 5, 7, 64, 50_000] {
            for shards in [1, 2, 3, 7, 8, 100] {
                let mut next = 0;
                for k in 1..=shards {
                    let r = range(k, shards, total);
                    assert_eq!(r.start, next, "{k}/{shards} of {total}");
                    assert!(r.len() == total / shards || r.len() == total / shards + 1);
                    next = r.end;
                }
                assert_eq!(next, total);
            }
        }
    }

    #[test]
    fn bad_specs_are_named() {
        assert_eq!(parse("3/8").unwrap(), (3, 8));
        assert_eq!(parse("1/1").unwrap(), (1, 1));
        for bad in ["0/2", "3/2", "1/0", "1", "a/2", "-1/2", "1/2/3", ""] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--shard {bad}:")) && !e.contains('\n'), "{bad}: {e}");
        }
    }
}
