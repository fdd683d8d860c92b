//! A training run: its folder (config.json, loss.csv, loss.png, samples/, ckpt.safetensors),
//! the loop with progress, periodic checkpoints and sample grids, resume and Ctrl-C.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{write_atomic, Checkpoint};
use crate::data::{self, Loader};
use crate::diffusion::{plan_steps, Sampler, SamplerKind, Schedule, TrainOptions, Trainer};
use crate::gpu::Context;
use crate::images;
use crate::model::Net;
use crate::progress::Progress;

/// Everything that defines a run; written to RUN/config.json and read back by --resume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    pub preset: String,
    /// The denoiser (`"model": "ddpm"` in config.json for the ANN; absent: the SNN).
    pub model: Net,
    /// Dataset path (None: the embedded MNIST subset).
    pub data: Option<PathBuf>,
    pub batch: usize,
    pub lr: f32,
    pub warmup: u64,
    pub ema: Option<f32>,
    pub seed: u64,
    /// Total optimizer steps of the run.
    pub steps: u64,
    /// Write a sample grid every this many steps (0: only at the end).
    pub sample_every: u64,
    /// Write the checkpoint every this many steps (it is always written at the end).
    pub ckpt_every: u64,
    /// Images per sample grid (0: none).
    pub sample_n: usize,
    /// DDIM steps of the sample grids.
    pub sample_steps: usize,
    /// FID/KID against `fid.reference` every this many steps (0: never).
    #[serde(default)]
    pub fid_every: u64,
    #[serde(default)]
    pub fid: FidConfig,
    /// The kernel variant chosen for every tuning key (crate::tune), so a resumed run uses the
    /// same kernels, and stays bit-identical, even if the tuner would choose differently today.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variants: BTreeMap<String, String>,
}

/// FID during training: samples of the current weights against reference statistics.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct FidConfig {
    /// pytorch-fid statistics (.npz) of the real data (`sddpm-gpu fid DATA --save-stats REF.npz`).
    pub reference: Option<PathBuf>,
    /// Samples per evaluation.
    pub n: usize,
    /// DDIM steps per sample.
    pub steps: usize,
    /// Inception weights (else $SDDPM_FID_WEIGHTS or the cache path).
    pub weights: Option<PathBuf>,
}

/// Add the variants chosen on `ctx` so far to `cfg` and rewrite RUN/config.json if that changed.
fn record_variants(ctx: &Context, cfg: &mut RunConfig, dir: &Path) -> Result<()> {
    let chosen = ctx.tuning.lock().unwrap().chosen.clone();
    let before = cfg.variants.len();
    for (key, name) in chosen {
        cfg.variants.entry(key).or_insert(name);
    }
    if cfg.variants.len() != before {
        write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(cfg)?.as_bytes())?;
    }
    Ok(())
}

pub const CKPT: &str = "ckpt.safetensors";

/// The model of a run in a few words, for the banner and the plot titles: preset, and the
/// extensions that make it differ from the reference (attention, LIF neurons, T).
pub fn describe(cfg: &RunConfig) -> String {
    let mut out = match &cfg.model {
        Net::Sddpm(_) => cfg.preset.clone(),
        Net::Ddpm(_) => format!("{} {}", cfg.model.kind(), cfg.preset),
    };
    if let Net::Sddpm(m) = &cfg.model {
        if !m.attn.is_empty() {
            let levels: Vec<String> = m.attn.iter().map(|l| l.to_string()).collect();
            out.push_str(&format!(
                ", attention at level{} {}{}",
                if levels.len() == 1 { "" } else { "s" },
                levels.join(","),
                if m.heads > 1 { format!(" ({} heads)", m.heads) } else { String::new() }
            ));
        }
        if m.neuron == crate::model::NeuronKind::Lif {
            out.push_str(&format!(", LIF neurons (tau {})", m.tau));
        }
        if m.snn_steps != 4 {
            out.push_str(&format!(", T = {}", m.snn_steps));
        }
    }
    out
}

/// Train `cfg` into `dir` (resuming from its checkpoint when `resume`).
///
/// Everything that can refuse the run is checked before anything slow or lasting: the data, the
/// checkpoint, the FID reference, whether the adapter can hold every graph the run will compile;
/// then every kernel shape the run needs (training step, sample grids, FID samples) is tuned
/// under one progress bar, the step is compiled, and only then is the run folder written, so a
/// run that cannot start leaves nothing behind.
pub fn train(ctx: &Context, cfg: &RunConfig, dir: &Path, resume: bool) -> Result<()> {
    let data = Arc::new(data::load(cfg.data.as_deref(), cfg.model.img_size())?);
    if data.channels != cfg.model.img_ch() {
        bail!(
            "{} has {}-channel images but the model (preset {}) expects {}; pick a matching --preset",
            data.name,
            data.channels,
            cfg.preset,
            cfg.model.img_ch()
        );
    }
    if data.len() < cfg.batch {
        bail!("{} holds {} images, fewer than one batch of {}", data.name, data.len(), cfg.batch);
    }
    let ckpt_path = dir.join(CKPT);
    let start = if resume {
        Checkpoint::load(&ckpt_path).with_context(|| format!("resuming {}", dir.display()))?
    } else {
        cfg.model.init_weights(cfg.seed)
    };
    let first = start.ints.get("optim.step").map_or(0, |s| s.data.first().copied().unwrap_or(0).max(0) as u64);
    if first >= cfg.steps {
        println!("{} is already at step {first} of {}; nothing to do (raise --steps)", dir.display(), cfg.steps);
        return Ok(());
    }
    let fid_ref = if cfg.fid_every > 0 { Some(FidRef::load(cfg)?) } else { None };
    let mut cfg = cfg.clone();
    let cfg = &mut cfg;
    eprintln!(
        "training {} {} ({} parameters) on {}, batch {}, steps {first}..{}, adapter {}",
        cfg.model.kind(),
        describe(cfg),
        cfg.model.parameter_count(),
        data.name,
        cfg.batch,
        cfg.steps,
        ctx.describe()
    );
    if resume {
        ctx.tuning.lock().unwrap().pinned.extend(cfg.variants.clone());
        crate::tune::pin_recorded(ctx, &start.metadata, &ckpt_path.display().to_string())?;
    }
    let opts = TrainOptions { lr: cfg.lr, warmup: cfg.warmup, ema: cfg.ema, ..Default::default() };
    tune_run(ctx, cfg, &opts)?;
    let mut trainer = Trainer::new(ctx, &cfg.model, &start, cfg.batch, cfg.model.img_size(), opts)?;
    let mut fid = fid_ref.map(|r| FidEval::new(ctx, r, cfg.fid.n)).transpose()?;

    std::fs::create_dir_all(dir.join("samples")).with_context(|| format!("cannot create {}", dir.display()))?;
    write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(cfg)?.as_bytes())?;
    record_variants(ctx, cfg, dir)?;
    let mut log = LossLog::open(&dir.join("loss.csv"), first)?;
    if let Some(f) = fid.as_mut() {
        f.open_log(dir, first)?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // A second handler cannot be installed in the same process (tests): then Ctrl-C just kills.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));

    let loader = Loader::start(data.clone(), cfg.batch, cfg.seed, first, cfg.steps, cfg.model.diffusion_steps());
    let bar = Progress::with_template("train", cfg.steps, "steps", "{bar:30} {pos}/{len} steps  {msg}  eta {eta}");
    bar.start_at(first);
    let title = format!("sddpm-gpu: {}", describe(cfg));
    let mut last = Instant::now();
    while trainer.step < cfg.steps {
        let batch = loader.next().context("the data loader stopped")?;
        let stats = trainer.step(ctx, &batch.x0, &batch.t, None, cfg.seed)?;
        if !stats.loss.is_finite() {
            trainer.save(ctx, &dir.join("ckpt_diverged.safetensors"), HashMap::new())?;
            bar.abandon();
            bail!("loss became {} at step {}; state saved to ckpt_diverged.safetensors", stats.loss, trainer.step);
        }
        let ips = cfg.batch as f64 / last.elapsed().as_secs_f64();
        last = Instant::now();
        log.push(trainer.step, stats.loss, trainer.lr(), ips)?;
        bar.set_message(format!("loss {:.4}  |g| {:.3}  {:.2} img/s", stats.loss, stats.grad_norm, ips));
        bar.set_position(trainer.step);
        let step = trainer.step;
        let interrupted = stop.load(Ordering::SeqCst);
        if interrupted || (cfg.ckpt_every > 0 && step % cfg.ckpt_every == 0) || step == cfg.steps {
            trainer.save(ctx, &ckpt_path, HashMap::new())?;
            log.flush_plot(&dir.join("loss.png"), &title)?;
        }
        if cfg.sample_n > 0 && ((cfg.sample_every > 0 && step % cfg.sample_every == 0) || step == cfg.steps) {
            bar.suspend(|| sample_grid(ctx, &trainer, cfg, &dir.join("samples").join(format!("step_{step:07}.png"))))?;
            record_variants(ctx, cfg, dir)?;
        }
        if let Some(f) = fid.as_mut().filter(|_| step % cfg.fid_every == 0) {
            bar.suspend(|| f.evaluate(ctx, &trainer, cfg, step))?;
        }
        if interrupted {
            bar.abandon();
            eprintln!("interrupted at step {step}: checkpoint saved to {}", ckpt_path.display());
            return Ok(());
        }
    }
    bar.finish(format!("done: {}", dir.display()));
    Ok(())
}

/// The batch of the samplers a run builds (grids, FID samples): the grid's, else the FID one's.
fn sampling_batch(cfg: &RunConfig) -> Option<usize> {
    if cfg.sample_n > 0 {
        Some(cfg.sample_n)
    } else if cfg.fid_every > 0 {
        Some(cfg.fid.n.min(FID_SAMPLE_BATCH))
    } else {
        None
    }
}

/// Check that the adapter holds every graph the run compiles and tune them all before the first
/// step: the training step and, when the run samples, the U-Net its samplers evaluate (the keys
/// hold for every batch, so grids and FID samples of any size reuse them).
fn tune_run(ctx: &Context, cfg: &RunConfig, opts: &TrainOptions) -> Result<()> {
    let (size, batch) = (cfg.model.img_size(), cfg.batch);
    let train = crate::diffusion::train_graph(&cfg.model, batch, size, opts)?;
    let (train_other, train_other_batch) = crate::diffusion::train_graph_other(&cfg.model, batch, size, opts)?;
    let mut graphs = vec![(train, batch, train_other, train_other_batch)];
    if let Some(n) = sampling_batch(cfg) {
        let (g, ..) = crate::model::eval_graph(cfg.model.clone(), n, size, 1.0)?;
        let (other, other_batch) = crate::model::eval_graph_other(&cfg.model, n, size, 1.0)?;
        graphs.push((g, n, other, other_batch));
    }
    let pairs: Vec<crate::tune::Batched> = graphs
        .iter()
        .map(|(graph, batch, other, other_batch)| crate::tune::Batched {
            graph,
            batch: *batch,
            other,
            other_batch: *other_batch,
        })
        .collect();
    crate::tune::tune_ahead(ctx, &pairs)?;
    Ok(())
}

fn sample_grid(ctx: &Context, trainer: &Trainer, cfg: &RunConfig, path: &Path) -> Result<()> {
    let weights = trainer.weights(ctx, cfg.ema.is_some())?;
    let rows = plan_steps(&Schedule::reference(cfg.model.diffusion_steps()), SamplerKind::Ddim, cfg.sample_steps)?;
    let size = cfg.model.img_size();
    let sampler = Sampler::new(ctx, &cfg.model, &weights, cfg.sample_n, size, 1.0, &rows)?;
    let x = sampler.sample_batch(ctx, cfg.seed, 0, &mut |_| {})?;
    let cols = (cfg.sample_n as f64).sqrt().ceil() as usize;
    images::save_grid(path, &x, [cfg.sample_n, cfg.model.img_ch(), size, size], cols)
}

/// loss.csv (step, loss, lr, images_per_s), kept consistent with the checkpoint on resume.
struct LossLog {
    path: PathBuf,
    file: std::fs::File,
    points: Vec<(u64, f32)>,
}

impl LossLog {
    fn open(path: &Path, resume_step: u64) -> Result<LossLog> {
        let mut kept = String::from("step,loss,lr,images_per_s\n");
        let mut points = Vec::new();
        if resume_step > 0 {
            if let Ok(text) = std::fs::read_to_string(path) {
                for line in text.lines().skip(1) {
                    let mut f = line.split(',');
                    let (Some(s), Some(l)) = (f.next(), f.next()) else { continue };
                    let (Ok(s), Ok(l)) = (s.parse::<u64>(), l.parse::<f32>()) else { continue };
                    if s <= resume_step {
                        kept.push_str(line);
                        kept.push('\n');
                        points.push((s, l));
                    }
                }
            }
        }
        write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(LossLog { path: path.to_path_buf(), file, points })
    }

    fn push(&mut self, step: u64, loss: f32, lr: f32, ips: f64) -> Result<()> {
        writeln!(self.file, "{step},{loss},{lr},{ips:.3}")
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.points.push((step, loss));
        Ok(())
    }

    fn flush_plot(&mut self, png: &Path, title: &str) -> Result<()> {
        self.file.flush()?;
        crate::plot::loss_plot(png, &self.points, title)
    }
}

/// Images per batch of the FID samples during training.
const FID_SAMPLE_BATCH: usize = 16;

/// What FID during training needs from disk, read before the run starts: the reference
/// statistics and the Inception weights.
struct FidRef {
    reference: crate::fid::Stats,
    weights: crate::fid::inception::Weights,
}

impl FidRef {
    fn load(cfg: &RunConfig) -> Result<FidRef> {
        use crate::fid::inception::{self, Weights};
        let f = &cfg.fid;
        let Some(reference) = &f.reference else {
            bail!("--fid-every needs --fid-ref STATS.npz (reference statistics)")
        };
        if f.n < 2 || f.steps == 0 {
            bail!("--fid-n must be at least 2 and --fid-steps at least 1");
        }
        let reference = crate::fid::npz::read_stats(reference)?;
        if reference.dim != inception::DIM {
            bail!(
                "--fid-ref holds {}-d statistics; the FID Inception gives {}-d features",
                reference.dim,
                inception::DIM
            );
        }
        let weights = Weights::load(&inception::locate_weights(f.weights.as_deref())?)?;
        Ok(FidRef { reference, weights })
    }
}

/// FID/KID of `fid.n` DDIM samples of the current weights against the reference statistics,
/// logged to fid.csv (step, fid, kid, kid_std) and plotted to fid.png.
struct FidEval {
    net: crate::fid::inception::Inception,
    reference: crate::fid::Stats,
    log: Option<LossLog>,
    png: PathBuf,
}

impl FidEval {
    fn new(ctx: &Context, r: FidRef, n: usize) -> Result<FidEval> {
        let net = crate::fid::inception::Inception::new(ctx, &r.weights, n.min(8))?;
        Ok(FidEval { net, reference: r.reference, log: None, png: PathBuf::new() })
    }

    /// Start (or, resuming, keep up to `first`) RUN/fid.csv.
    fn open_log(&mut self, dir: &Path, first: u64) -> Result<()> {
        // LossLog keeps the rows up to a resumed step; only the header differs.
        let mut log = LossLog::open(&dir.join("fid.csv"), first)?;
        let kept = std::fs::read_to_string(&log.path)?;
        let rows = kept.split_once('\n').map_or("", |(_, rows)| rows);
        write_atomic(&log.path, format!("step,fid,kid,kid_std\n{rows}").as_bytes())?;
        log.file = std::fs::OpenOptions::new().append(true).open(&log.path)?;
        self.log = Some(log);
        self.png = dir.join("fid.png");
        Ok(())
    }

    fn evaluate(&mut self, ctx: &Context, trainer: &Trainer, cfg: &RunConfig, step: u64) -> Result<()> {
        let (n, size, c) = (cfg.fid.n, cfg.model.img_size(), cfg.model.img_ch());
        let weights = trainer.weights(ctx, cfg.ema.is_some())?;
        let rows = plan_steps(&Schedule::reference(cfg.model.diffusion_steps()), SamplerKind::Ddim, cfg.fid.steps)?;
        let batch = n.min(FID_SAMPLE_BATCH);
        let sampler = Sampler::new(ctx, &cfg.model, &weights, batch, size, 1.0, &rows)?;
        let per = c * size * size;
        let mut pixels = Vec::with_capacity(n * per);
        for k in 0..n.div_ceil(batch) {
            let x = sampler.sample_batch(ctx, cfg.seed, (k * batch) as u32, &mut |_| {})?;
            let keep = batch.min(n - k * batch);
            // What the PNGs of `sample --out-dir` would hold.
            pixels.extend(x[..keep * per].iter().map(|&v| images::to_u8(v)));
        }
        let samples = crate::fid::inputs::Images::Dataset { pixels, channels: c, size };
        let feats = samples.features(ctx, &self.net, &mut |_| {})?;
        let stats = crate::fid::Stats::from_features(feats, crate::fid::inception::DIM)?;
        let fid = crate::fid::fid(&stats, &self.reference)?;
        let kid = match (&stats.features, &self.reference.features) {
            (Some(a), Some(b)) => Some(crate::fid::kid(a, b, stats.dim)?),
            _ => None,
        };
        let (k, ks) = kid.map_or((f64::NAN, f64::NAN), |k| (k.mean, k.std));
        let log = self.log.as_mut().expect("the log is opened before training");
        writeln!(log.file, "{step},{fid},{k},{ks}").with_context(|| format!("writing {}", log.path.display()))?;
        log.points.push((step, fid as f32));
        eprintln!("step {step}: FID {fid:.3}, KID {k:.5} ({n} samples, {} DDIM steps)", cfg.fid.steps);
        log.file.flush()?;
        let title = format!("sddpm-gpu: {}: FID of {n} samples", describe(cfg));
        crate::plot::series_plot(&self.png, &log.points, &title, "FID")
    }
}
