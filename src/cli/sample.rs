//! `sample`: images from a trained model (or a preset's untrained weights), sharded or not.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::ValueEnum;

use sddpm_gpu::diffusion::{plan_steps, Sampler, SamplerKind, Schedule};
use sddpm_gpu::dist::{self, Comm};
use sddpm_gpu::images;
use sddpm_gpu::progress::Progress;

use super::{check_threshold, check_threshold_value, load_model, WeightsArg};

#[derive(Clone, Copy, ValueEnum)]
pub enum SamplerArg {
    /// Ancestral DDPM, 'fixedlarge' variance. At --steps 1000 (default) exactly the reference's
    /// sampler; with fewer steps it uses the posterior of the strided chain, which is correct for
    /// any stride (the reference's own 'ddpm' is only right at 1000 steps).
    Ddpm,
    /// DDIM, eta = 0 (the reference's 'ddim').
    Ddim,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("model_source").required(true).args(["checkpoint", "preset"])))]
pub struct SampleArgs {
    /// Model weights: a safetensors checkpoint or an official SDDPM / pytorch-ddpm .pt.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// With --checkpoint: ema or raw [default: ema when the checkpoint has EMA weights, as
    /// pytorch-ddpm samples].
    #[arg(long, value_enum, requires = "checkpoint")]
    pub weights: Option<WeightsArg>,
    /// Untrained weights of a preset instead of a checkpoint (for timing; images are noise):
    /// cifar10, celeba64, mnist, fashion, small, tiny.
    #[arg(long)]
    pub preset: Option<String>,
    /// Model of --preset: sddpm or ddpm.
    #[arg(long, conflicts_with = "checkpoint")]
    pub model: Option<String>,
    /// Number of images.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    pub n: usize,
    /// Images per GPU batch (default: min(n, 16)).
    #[arg(long, allow_negative_numbers = true)]
    pub batch: Option<usize>,
    #[arg(long, value_enum, default_value = "ddpm")]
    pub sampler: SamplerArg,
    /// Sampling steps (default: 1000 for ddpm, 100 for ddim).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Firing threshold of every neuron (threshold guidance; the paper's best is 0.997).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub threshold: f32,
    /// Noise seed: the same seed on the same adapter gives identical files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Spiking time steps T (default: the checkpoint's, else 4).
    #[arg(long)]
    pub snn_steps: Option<usize>,
    /// Image side in pixels (default: the checkpoint's config, else 32).
    #[arg(long)]
    pub size: Option<usize>,
    /// Write a grid of all images here, PNG or JPEG by the name's extension (default
    /// samples.png unless --out-dir is given); the folder must exist.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write one PNG per image into this folder (for FID tools).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Sample only share K of N of the --n images (1 <= K <= N; e.g. a job array's task id),
    /// into --out-dir, named by global index: the files one unsharded run writes for them.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,
    /// Write into an --out-dir that already holds PNGs this run would replace, or PNGs of
    /// another run (refused without it: a later `fid` would mix them in).
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(adapter: Option<&str>, a: &SampleArgs) -> Result<()> {
    let comm = dist::world()?;
    let result = sample_ranks(adapter, comm.as_ref(), a);
    super::end_ranks(comm.as_ref(), result)
}

/// Under N MPI ranks the job's images (all --n, or the --shard's) are split as --shard splits
/// them: rank r samples share r + 1 of N, named by global index, so the folder ends up with the
/// files one process writes. Rank 0 checks the arguments and the folder for the whole job first.
fn sample_ranks(adapter: Option<&str>, comm: &dyn Comm, a: &SampleArgs) -> Result<()> {
    let ranks = comm.size();
    let job = dist::decide(comm, || {
        check_sample_args(a)?;
        let images = match &a.shard {
            Some(spec) => {
                let (k, shards) = sddpm_gpu::shard::parse(spec)?;
                if a.out_dir.is_none() || a.out.is_some() {
                    bail!("--shard writes one PNG per image into --out-dir (no grid --out); add --out-dir DIR");
                }
                sddpm_gpu::shard::range(k, shards, a.n)
            }
            None => 0..a.n,
        };
        if ranks > 1 && (a.out_dir.is_none() || a.out.is_some()) {
            bail!(
                "under {ranks} MPI ranks sample writes one PNG per image into --out-dir (each rank its share; no grid --out); add --out-dir DIR"
            );
        }
        check_threshold_value(a.threshold)?;
        check_sample_outputs(a, &images)?;
        Ok(images)
    })?;
    let mine = sddpm_gpu::shard::range(comm.rank() + 1, ranks, job.len());
    let images = job.start + mine.start..job.start + mine.end;
    let count = images.len();
    // The model is checked even when this shard is empty: a bad --checkpoint fails every shard.
    let (ckpt, cfg) = load_model(
        a.checkpoint.as_deref(),
        WeightsArg::which(a.weights),
        a.model.as_deref(),
        a.preset.as_deref(),
        a.snn_steps,
        a.seed,
    )?;
    check_threshold(&cfg, a.threshold)?;
    if count == 0 {
        let rank = if ranks > 1 { format!(" (rank {} of {ranks})", comm.rank()) } else { String::new() };
        println!("shard {}{rank} of {} images is empty: nothing to write", a.shard.as_deref().unwrap_or(""), a.n);
        return Ok(());
    }
    let size = a.size.unwrap_or(cfg.img_size());
    // More per batch than there are images would only sample padding.
    let batch = a.batch.unwrap_or(16).min(count);
    cfg.validate_run(size, batch)?;
    let (kind, default_steps) = match a.sampler {
        SamplerArg::Ddpm => (SamplerKind::Ddpm, cfg.diffusion_steps()),
        SamplerArg::Ddim => (SamplerKind::Ddim, 100.min(cfg.diffusion_steps())),
    };
    let rows = plan_steps(&Schedule::reference(cfg.diffusion_steps()), kind, a.steps.unwrap_or(default_steps))?;
    let ctx = super::open_context(adapter, comm)?;
    if let Some(path) = &a.checkpoint {
        sddpm_gpu::tune::pin_recorded(&ctx, &ckpt.metadata, &path.display().to_string())?;
    }
    let sampler = Sampler::new(&ctx, &cfg, &ckpt, batch, size, a.threshold, &rows)?;
    let batches = count.div_ceil(batch);
    let bar = Progress::new("sample", (batches * sampler.steps) as u64, "network evals");
    let per_image = cfg.img_ch() * size * size;
    let mut all = Vec::with_capacity(count * per_image);
    for k in 0..batches {
        bar.set_message(format!("images {}/{count}", k * batch));
        let base = (k * sampler.steps) as u64;
        let first = (images.start + k * batch) as u32;
        let x = sampler.sample_batch(&ctx, a.seed, first, &mut |done| bar.set_position(base + done as u64))?;
        let keep = batch.min(count - k * batch);
        all.extend_from_slice(&x[..keep * per_image]);
    }
    bar.finish(format!("images {count}/{count}"));
    let shape = [count, cfg.img_ch(), size, size];
    let grid = a.out.clone().or_else(|| a.out_dir.is_none().then(|| PathBuf::from("samples.png")));
    if let Some(path) = &grid {
        images::save_grid(path, &all, shape, (count as f64).sqrt().ceil() as usize)?;
        println!("wrote {}", path.display());
    }
    if let Some(dir) = &a.out_dir {
        images::save_each(dir, &all, shape, images.start)?;
        println!("wrote {count} images (indices {}..{} of {}) to {}", images.start, images.end, a.n, dir.display());
    }
    Ok(())
}

/// `sample`'s checks that need no model: the image count fits the 32-bit noise key, and the
/// output folder is writable and holds no PNGs this run would silently mix with (unless
/// --overwrite). Runs before the checkpoint is loaded or any GPU work.
fn check_sample_outputs(a: &SampleArgs, images: &std::ops::Range<usize>) -> Result<()> {
    // Noise is keyed by a u32 image index (ops::sampler): more images would repeat noise.
    if a.n as u64 > 1 << 32 {
        bail!("--n {} is more than 4294967296 images, the most one seed can draw distinct noise for; use several --seed values", a.n);
    }
    let Some(dir) = &a.out_dir else { return Ok(()) };
    sddpm_gpu::fsutil::check_dir_writable(dir, "--out-dir")?;
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    // Another shard's images (indices in 0..n outside ours) belong to the same job; anything
    // else (ours to overwrite, or PNGs of another run) would mix into a later `fid`.
    let theirs = |name: &str| {
        let index = name.strip_suffix(".png").filter(|s| s.len() >= 6).and_then(|s| s.parse::<usize>().ok());
        index.is_some_and(|i| i < a.n && !images.contains(&i))
    };
    let stale: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.to_lowercase().ends_with(".png") && !theirs(n))
        .collect();
    if !stale.is_empty() && !a.overwrite {
        let mut shown = stale.clone();
        shown.sort();
        bail!(
            "--out-dir {} already holds {} PNG image(s) (e.g. {}) that this run would overwrite or that are not \
             part of it (a later `fid` reads every PNG there); use an empty folder, or --overwrite",
            dir.display(),
            stale.len(),
            shown[0]
        );
    }
    if !stale.is_empty() {
        eprintln!(
            "note: --overwrite: {} PNG image(s) already in {} are replaced or kept beside this run's",
            stale.len(),
            dir.display()
        );
    }
    Ok(())
}

/// `sample`'s arguments that need no file and no GPU (see `train`'s `check_train_args`).
fn check_sample_args(a: &SampleArgs) -> Result<()> {
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    if a.batch == Some(0) {
        bail!("--batch must be at least 1 (images per GPU batch)");
    }
    if let Some(out) = &a.out {
        check_image_out("--out", out)?;
    }
    if let Some(dir) = a.out_dir.as_ref().filter(|d| d.exists() && !d.is_dir()) {
        bail!("--out-dir {} is a file; give a folder (it is created if missing)", dir.display());
    }
    Ok(())
}

/// An image file to write: a PNG or JPEG name (or none: PNG) in a folder that exists (nothing is created on
/// the way, and nothing is computed for a path that cannot be written).
fn check_image_out(flag: &str, path: &Path) -> Result<()> {
    // JPEG for .jpg/.jpeg, PNG for .png or no extension; any other would get bytes it does not name.
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase());
    if !matches!(ext.as_deref(), None | Some("png" | "jpg" | "jpeg")) {
        bail!("{flag} {}: the file is written as PNG or JPEG; name it .png, .jpg or .jpeg", path.display());
    }
    if path.is_dir() {
        bail!("{flag} {} is a folder; give a file name, e.g. {}", path.display(), path.join("grid.png").display());
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.exists() {
        bail!("{flag} {}: folder {} does not exist; create it first", path.display(), parent.display());
    }
    if !parent.is_dir() {
        bail!("{flag} {}: {} is a file, not a folder", path.display(), parent.display());
    }
    Ok(())
}
