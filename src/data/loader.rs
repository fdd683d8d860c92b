//! Batches as pure functions of (seed, step), prefetched on a background thread so the GPU never
//! waits for the host to shuffle, flip and convert.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::Dataset;

/// Mix a seed with a stream and an index into an RNG seed (SplitMix64 finaliser).
fn mix(seed: u64, stream: u64, index: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One training batch: images in [-1, 1] [B, C, S, S] and timesteps t [B] (uniform in 0..T).
pub struct Batch {
    pub step: u64,
    pub x0: Vec<f32>,
    pub t: Vec<u32>,
}

/// The batch of training step `step` (0-based): drop_last epochs of a per-epoch permutation.
pub fn batch_at(data: &Dataset, batch: usize, seed: u64, step: u64, diffusion_steps: usize) -> Batch {
    share_at(data, batch, 0..batch, seed, step, diffusion_steps)
}

/// Images `rows` (global indices within the batch) of [`batch_at`]'s batch, and their
/// timesteps: one data-parallel rank's share. Only those images are converted; every flip and
/// timestep of the batch is still drawn, in order, so a share is exactly those rows of the whole
/// batch, whatever the number of ranks.
pub fn share_at(
    data: &Dataset,
    batch: usize,
    rows: std::ops::Range<usize>,
    seed: u64,
    step: u64,
    diffusion_steps: usize,
) -> Batch {
    assert!(rows.end <= batch, "rows {rows:?} of a batch of {batch}");
    let per_epoch = (data.len() / batch).max(1) as u64;
    let (epoch, k) = (step / per_epoch, (step % per_epoch) as usize);
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(mix(seed, 1, epoch)));
    let mut rng = StdRng::seed_from_u64(mix(seed, 2, step));
    let per = data.channels * data.size * data.size;
    let s = data.size;
    let mut x0 = Vec::with_capacity(batch * per);
    for j in 0..batch {
        let idx = order[(k * batch + j) % order.len()];
        let img = &data.pixels[idx * per..(idx + 1) * per];
        let flip = data.flip && rng.random_bool(0.5);
        if !rows.contains(&j) {
            continue;
        }
        for c in 0..data.channels {
            for y in 0..s {
                for x in 0..s {
                    let sx = if flip { s - 1 - x } else { x };
                    x0.push(img[(c * s + y) * s + sx] as f32 / 255.0 * 2.0 - 1.0);
                }
            }
        }
    }
    let t: Vec<u32> = (0..batch).map(|_| rng.random_range(0..diffusion_steps as u32)).collect();
    Batch { step, x0, t: t[rows].to_vec() }
}

/// Background producer of the batches for steps `from..to`, two ahead of the consumer.
pub struct Loader {
    rx: Receiver<Batch>,
    handle: Option<JoinHandle<()>>,
}

impl Loader {
    pub fn start(data: Arc<Dataset>, batch: usize, seed: u64, from: u64, to: u64, diffusion_steps: usize) -> Loader {
        Self::start_share(data, batch, 0..batch, seed, from, to, diffusion_steps)
    }

    /// [`Loader::start`] for the images `rows` of every batch (see [`share_at`]).
    pub fn start_share(
        data: Arc<Dataset>,
        batch: usize,
        rows: std::ops::Range<usize>,
        seed: u64,
        from: u64,
        to: u64,
        diffusion_steps: usize,
    ) -> Loader {
        let (tx, rx) = sync_channel(2);
        let handle = std::thread::spawn(move || {
            for step in from..to {
                if tx.send(share_at(&data, batch, rows.clone(), seed, step, diffusion_steps)).is_err() {
                    return;
                }
            }
        });
        Loader { rx, handle: Some(handle) }
    }

    pub fn next(&self) -> Option<Batch> {
        self.rx.recv().ok()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Unblock the producer (its send fails once the receiver is gone), then join it.
        let (_, dead) = sync_channel(0);
        drop(std::mem::replace(&mut self.rx, dead));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Format;

    /// A share is exactly its rows of the whole batch (images and timesteps), with and without
    /// flips, for shares of several sizes: the global batch does not depend on the ranks.
    #[test]
    fn shares_are_rows_of_the_whole_batch() {
        for flip in [false, true] {
            let (c, s, n) = (3, 5, 23);
            let pixels = (0..n * c * s * s).map(|i| (i * 7 % 251) as u8).collect();
            let data = Dataset { name: "toy".into(), format: Format::Idx, channels: c, size: s, pixels, flip };
            let per = c * s * s;
            for batch in [6, 7] {
                for step in [0, 3, 9] {
                    let whole = batch_at(&data, batch, 11, step, 1000);
                    for rows in [0..batch, 0..1, 2..5, batch - 1..batch] {
                        let part = share_at(&data, batch, rows.clone(), 11, step, 1000);
                        assert_eq!(part.t, whole.t[rows.clone()], "t of rows {rows:?}");
                        assert_eq!(part.x0, whole.x0[rows.start * per..rows.end * per], "x0 of rows {rows:?}");
                    }
                }
            }
        }
    }
}
