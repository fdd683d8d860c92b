//! Data-parallel training across processes (issue 18): a communicator between ranks, one rank per
//! GPU. [`Comm`] is what the trainer and the run need: rank and size, element-wise sums of f32
//! buffers (pipelined: each buffer's sum starts as soon as it is produced, while the next one is
//! still being computed), and small agreements (stop flags, parameter checksums). [`Single`] is
//! the one-process communicator every build has; the MPI one (`mpi::Mpi`) needs the cargo
//! feature `mpi` (the `mpi` crate over an installed MPI library), so the default build and most
//! tests need no MPI.

use anyhow::{bail, Result};

#[cfg(feature = "mpi")]
pub mod mpi;

/// A group of ranks that train one model together.
pub trait Comm {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;

    /// Sums `sizes.len()` buffers over all ranks, in order: `produce(k, buf)` fills buffer k
    /// (`sizes[k]` values; it may wait for the GPU to finish them); its sum is started at once,
    /// without waiting, while buffer k + 1 is produced; `consume(k, sums)` receives the sums in
    /// order once all were started. Every rank must call this with the same sizes.
    fn sum_pipelined(
        &self,
        sizes: &[usize],
        produce: &mut dyn FnMut(usize, &mut [f32]) -> Result<()>,
        consume: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()>;

    /// The element-wise sum of `values` over all ranks.
    fn sum(&self, values: &[f32]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.sum_pipelined(
            &[values.len()],
            &mut |_, buf| {
                buf.copy_from_slice(values);
                Ok(())
            },
            &mut |_, sums| {
                out = sums.to_vec();
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Ends every rank at once (MPI_Abort): a rank that fails must not leave the others waiting
    /// in a collective. Nothing to do in one process.
    fn abort(&self, _code: i32) {}

    /// The (smallest, largest) of `v` over all ranks.
    fn min_max(&self, v: u64) -> Result<(u64, u64)>;

    /// Rank 0's `bytes` on every rank (the others' `bytes` are replaced): a decision made once
    /// (a run's settings and folder, the kernel variants) that every rank must follow.
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()>;

    /// Whether any rank says `flag` (every rank gets the same answer: a stop agreed on).
    fn any(&self, flag: bool) -> Result<bool> {
        Ok(self.min_max(flag as u64)?.1 == 1)
    }

    /// Fails unless every rank holds the same `checksum` (named `what` in the error).
    fn check_same(&self, checksum: u64, what: &str) -> Result<()> {
        let (lo, hi) = self.min_max(checksum)?;
        if lo != hi {
            bail!(
                "rank {}: {what} differs between ranks (checksums {lo:016x} .. {hi:016x}); the ranks diverged",
                self.rank()
            );
        }
        Ok(())
    }
}

/// One process: sums are the values themselves.
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn sum_pipelined(
        &self,
        sizes: &[usize],
        produce: &mut dyn FnMut(usize, &mut [f32]) -> Result<()>,
        consume: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let mut bufs: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0f32; n]).collect();
        for (k, b) in bufs.iter_mut().enumerate() {
            produce(k, b)?;
        }
        for (k, b) in bufs.iter().enumerate() {
            consume(k, b)?;
        }
        Ok(())
    }

    fn min_max(&self, v: u64) -> Result<(u64, u64)> {
        Ok((v, v))
    }

    fn broadcast(&self, _bytes: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
}

/// An error every rank hit alike, already reported by rank 0: the other ranks exit with this
/// status without printing it again (one line per job, not one per rank).
#[derive(Debug)]
pub struct SaidByRank0(pub u8);

impl std::fmt::Display for SaidByRank0 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank 0 reported why this run stopped (exit status {})", self.0)
    }
}

impl std::error::Error for SaidByRank0 {}

/// A stop every rank agreed on at the same step (see `run::train`): no rank waits for another,
/// so the job ends normally (no MPI_Abort). Displays and chains as the interrupt it carries.
#[derive(Debug)]
pub struct AllStopped(pub crate::signal::Interrupted);

impl std::fmt::Display for AllStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for AllStopped {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Rank 0's error in a decision every rank follows ([`decide`]): the others got it too and stop
/// without waiting for anyone. Displays as the error itself, with its causes.
#[derive(Debug)]
pub struct Agreed(pub anyhow::Error);

impl std::fmt::Display for Agreed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Agreed {}

/// Whether `e` is an outcome every rank reached together ([`AllStopped`], [`Agreed`],
/// [`SaidByRank0`]): then no rank is left waiting and the job need not be aborted.
pub fn agreed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<AllStopped>() || c.is::<Agreed>() || c.is::<SaidByRank0>())
}

/// Rank 0's outcome of `f` on every rank: rank 0 runs it, the others receive its value (JSON) or
/// its error; on ranks above 0 an error is a [`SaidByRank0`], since rank 0 prints it.
pub fn decide<T: serde::Serialize + serde::de::DeserializeOwned>(
    comm: &dyn Comm,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let mut bytes = Vec::new();
    let mine = if comm.rank() == 0 {
        let r = f();
        let msg: std::result::Result<serde_json::Value, String> = match &r {
            Ok(v) => Ok(serde_json::to_value(v)?),
            Err(e) => Err(format!("{e:#}")),
        };
        bytes = serde_json::to_vec(&msg)?;
        Some(r)
    } else {
        None
    };
    comm.broadcast(&mut bytes)?;
    if let Some(r) = mine {
        return r.map_err(|e| if comm.size() > 1 { Agreed(e).into() } else { e });
    }
    let msg: std::result::Result<serde_json::Value, String> = serde_json::from_slice(&bytes)?;
    match msg {
        Ok(v) => Ok(serde_json::from_value(v)?),
        Err(_) => Err(SaidByRank0(1).into()),
    }
}

/// Whether a launcher started this process as one of several ranks (Open MPI, MPICH/PMI, Slurm's
/// srun): such a process must not train alone.
pub fn launched_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
        .filter(|&n| n > 1)
}

/// The node-local index of this rank (picks its GPU): Open MPI's, Slurm's, MPICH's, else 0.
pub fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
        .unwrap_or(0)
}

/// The communicator of this process: MPI's world when built with the `mpi` feature, else
/// [`Single`]; a process that a launcher started as one of several ranks fails without MPI
/// support rather than train alone N times.
pub fn world() -> Result<Box<dyn Comm>> {
    #[cfg(feature = "mpi")]
    {
        Ok(Box::new(mpi::Mpi::init()?))
    }
    #[cfg(not(feature = "mpi"))]
    {
        if let Some(n) = launched_ranks() {
            bail!(
                "started as one of {n} MPI ranks, but this sddpm-gpu was built without MPI support; \
                 rebuild with `cargo build --release --features mpi`"
            );
        }
        Ok(Box::new(Single))
    }
}

/// A cheap checksum of f32 data (its bits, CRC-32 of each buffer chained with its length), to
/// compare parameters across ranks.
pub fn checksum<'a>(buffers: impl IntoIterator<Item = &'a [f32]>) -> u64 {
    let mut h = crc32fast::Hasher::new();
    let mut len = 0u64;
    for b in buffers {
        h.update(bytemuck::cast_slice(b));
        len += b.len() as u64;
    }
    (h.finalize() as u64) << 32 | (len & 0xffff_ffff)
}

/// Rows `r * share .. (r + 1) * share` of a global batch of `batch` rows: this rank's share.
/// The batch must divide by the ranks.
pub fn share(batch: usize, comm: &dyn Comm, flag: &str) -> Result<std::ops::Range<usize>> {
    let n = comm.size();
    if !batch.is_multiple_of(n) {
        bail!("{flag} {batch} must divide by the {n} ranks (each rank takes an equal share of every batch)");
    }
    let per = batch / n;
    Ok(comm.rank() * per..(comm.rank() + 1) * per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_sums_are_the_values_in_order() {
        let c = Single;
        let mut seen = Vec::new();
        c.sum_pipelined(
            &[2, 3],
            &mut |k, b| {
                b.iter_mut().enumerate().for_each(|(i, v)| *v = (10 * k + i) as f32);
                Ok(())
            },
            &mut |k, s| {
                seen.push((k, s.to_vec()));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, [(0, vec![0.0, 1.0]), (1, vec![10.0, 11.0, 12.0])]);
        assert!(!c.any(false).unwrap() && c.any(true).unwrap());
        c.check_same(7, "x").unwrap();
        assert_eq!(share(6, &c, "--batch").unwrap(), 0..6);
    }

    #[test]
    fn checksum_sees_every_bit() {
        let a = [1.0f32, 2.0, 3.0];
        let mut b = a;
        b[1] = f32::from_bits(b[1].to_bits() ^ 1);
        assert_ne!(checksum([&a[..]]), checksum([&b[..]]));
        assert_eq!(checksum([&a[..]]), checksum([&a[..]]));
    }
}
