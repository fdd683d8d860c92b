//! A training run: its folder (config.json, loss.csv, loss.png, samples/, ckpt.safetensors),
//! the loop with progress, periodic checkpoints and sample grids, resume, the folder's lock and
//! interrupts (SIGINT, SIGTERM).

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::data::{self, Loader};
use crate::diffusion::{plan_steps, NonFinite, Sampler, SamplerKind, Schedule, TrainOptions, Trainer};
use crate::dist::Comm;
use crate::gpu::Context;
use crate::images;
use crate::model::Net;
use crate::progress::Progress;
use crate::{fsutil, signal};

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
    /// BatchNorm groups of every batch (`--bn-groups`; 1: the whole batch).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub bn_groups: usize,
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

/// The settings a resumed run must keep to stay bit-identical (besides the model, which the
/// checkpoint stores as `config`): stored in every checkpoint's metadata key `run`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Identity {
    batch: usize,
    lr: f32,
    warmup: u64,
    ema: Option<f32>,
    seed: u64,
    /// Absent in checkpoints from before --bn-groups: one group.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    bn_groups: usize,
}

fn one() -> usize {
    1
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

impl RunConfig {
    fn identity(&self) -> Identity {
        Identity {
            batch: self.batch,
            lr: self.lr,
            warmup: self.warmup,
            ema: self.ema,
            seed: self.seed,
            bn_groups: self.bn_groups,
        }
    }

    /// Check every number before any work: the model builds at its size, and the optimizer and
    /// sampling settings are usable. Errors name the setting (the flag of the same name).
    pub fn validate(&self) -> Result<()> {
        self.model.validate_run(self.model.img_size(), self.batch.max(1))?;
        if self.batch == 0 {
            bail!("batch must be at least 1 (--batch)");
        }
        if self.bn_groups == 0 || !self.batch.is_multiple_of(self.bn_groups) {
            bail!(
                "bn_groups (--bn-groups) {} must be at least 1 and divide the batch of {}",
                self.bn_groups,
                self.batch
            );
        }
        if self.bn_groups > 1 && matches!(self.model, Net::Ddpm(_)) {
            bail!("bn_groups (--bn-groups) applies to the SNN's BatchNorm; the ANN (--model ddpm) has none");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("lr (--lr) must be a positive finite learning rate, got {}", self.lr);
        }
        if let Some(e) = self.ema {
            if !(0.0..1.0).contains(&e) {
                bail!("ema (--ema) must be a decay in [0, 1), e.g. 0.9999, got {e}");
            }
        }
        if self.sample_n > 0 {
            plan_steps(&Schedule::reference(self.model.diffusion_steps()), SamplerKind::Ddim, self.sample_steps)
                .map_err(|e| anyhow!("sample_steps (--sample-steps) {}: {e}", self.sample_steps))?;
        }
        Ok(())
    }

    /// The fields of this config that differ from what `ckpt` was trained with, as
    /// "field: config.json has A, the checkpoint B" (empty: it may be resumed).
    fn differences(&self, ckpt: &Checkpoint) -> Result<Vec<String>> {
        let mut out = Vec::new();
        // Both sides compared as JSON text parsed back, so an f32 compares as it is written
        // (0.0002), not widened to f64 (0.000199999...).
        let json = |text: String| -> serde_json::Value { serde_json::from_str(&text).unwrap_or_default() };
        let mut compare = |prefix: &str, ours: String, theirs: String| {
            let (ours, theirs) = (json(ours), json(theirs));
            let (Some(a), Some(b)) = (ours.as_object(), theirs.as_object()) else { return };
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let (x, y) = (a.get(k), b.get(k));
                if x != y {
                    let show = |v: Option<&serde_json::Value>| v.map_or("nothing".to_string(), |v| v.to_string());
                    out.push(format!("'{prefix}{k}' is {} but the checkpoint has {}", show(x), show(y)));
                }
            }
        };
        if let Some(json) = ckpt.metadata.get("config") {
            let theirs = Net::from_json(json)
                .map_err(|e| anyhow!("{}: metadata 'config' is not a model config: {e}", ckpt.path.display()))?;
            compare("model.", serde_json::to_string(&self.model)?, serde_json::to_string(&theirs)?);
        }
        if let Some(json) = ckpt.metadata.get(RUN_METADATA) {
            let theirs: Identity = serde_json::from_str(json).map_err(|e| {
                anyhow!("{}: metadata '{RUN_METADATA}' is not a run's settings: {e}", ckpt.path.display())
            })?;
            compare("", serde_json::to_string(&self.identity())?, serde_json::to_string(&theirs)?);
        }
        Ok(out)
    }
}

/// Metadata key of the run settings in a run's checkpoints.
const RUN_METADATA: &str = "run";

/// Add the variants chosen on `ctx` so far to `cfg`; true if that changed anything.
fn record_variants(ctx: &Context, cfg: &mut RunConfig) -> bool {
    let chosen = crate::tune::tuning(ctx).lock().unwrap().chosen.clone();
    let before = cfg.variants.len();
    for (key, name) in chosen {
        cfg.variants.entry(key).or_insert(name);
    }
    cfg.variants.len() != before
}

fn write_config(cfg: &RunConfig, dir: &Path) -> Result<()> {
    fsutil::write_atomic_synced(&dir.join("config.json"), serde_json::to_string_pretty(cfg)?.as_bytes())
}

pub const CKPT: &str = "ckpt.safetensors";
/// Where a diverged run's state goes (never over the last good checkpoint).
pub const DIVERGED: &str = "ckpt_diverged.safetensors";

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

/// The files a run writes into its folder (besides the checkpoints and samples/).
const RUN_FILES: &[&str] = &["config.json", "loss.csv", "loss.png", "fid.csv", "fid.png"];

/// Remove what a fresh run wrote before its first checkpoint, so an interrupted or failed start
/// leaves nothing behind (the folder too, if the run made it). Returns what it says to the user.
fn remove_unstarted(dir: &Path, made_dir: bool) -> String {
    for f in RUN_FILES {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let samples = dir.join("samples");
    if let Ok(entries) = std::fs::read_dir(&samples) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("step_") && name.ends_with(".png") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(&samples);
    let _ = std::fs::remove_file(dir.join(fsutil::LOCK_FILE));
    if made_dir && std::fs::remove_dir(dir).is_ok() {
        format!("removed {} (nothing to resume)", dir.display())
    } else {
        format!("removed this run's files from {} (nothing to resume)", dir.display())
    }
}

/// Train `cfg` into `dir` (resuming from its checkpoint when `resume`). The folder is locked for
/// the whole run. Interrupts (see [`crate::signal`]; `main` installs the handlers before any
/// work) stop it at the next tuning candidate or training step: a run with a checkpoint saves one
/// and says how to resume; a new run stopped before its first checkpoint removes what it wrote.
/// Either way the error is a [`signal::Interrupted`].
///
/// Everything that can refuse the run comes before anything slow: the data, the checkpoint, the
/// FID reference, whether the adapter can hold every graph the run compiles; then the banner, and
/// every kernel shape the run needs (training step, sample grids, FID samples) is tuned under one
/// progress bar before the first step.
///
/// Under several ranks (`comm`, see [`crate::dist`]) every rank trains its share of each batch
/// and rank 0 alone owns the folder: it locks it, writes config.json, loss.csv, plots, samples
/// and checkpoints; the others only read (the data, and the checkpoint on resume: the folder
/// must be on a file system every rank sees). A stop is agreed on after every step, so an
/// interrupt on any rank stops all of them after the same step with one checkpoint.
pub fn train(ctx: &Context, comm: &dyn Comm, cfg: &RunConfig, dir: &Path, resume: bool) -> Result<()> {
    if comm.rank() != 0 {
        let mut cfg = cfg.clone();
        return train_locked(ctx, comm, &mut cfg, dir, resume, &mut false);
    }
    let made_dir = !dir.exists();
    let _lock = fsutil::DirLock::acquire(dir, "training run")?;
    if !resume && (dir.join(CKPT).exists() || dir.join("config.json").exists()) {
        bail!("{} already holds a run; continue it with --resume {0} or pick another --out", dir.display());
    }
    let mut cfg = cfg.clone();
    let mut started = false;
    let result = train_locked(ctx, comm, &mut cfg, dir, resume, &mut started);
    let Err(e) = result else { return Ok(()) };
    // An interrupt in the loop says what it saved; one during setup (tuning) is said here.
    let unsaid = signal::interrupted(&e).filter(|i| i.outcome.is_empty()).map(|i| i.signal);
    if !resume && !started && !dir.join(CKPT).exists() && !dir.join(DIVERGED).exists() {
        let removed = remove_unstarted(dir, made_dir);
        return Err(match unsaid {
            Some(signal) => {
                signal::Interrupted { signal, outcome: format!("stopped before the first step; {removed}") }.into()
            }
            None => {
                eprintln!("note: {removed}");
                e
            }
        });
    }
    Err(match unsaid {
        Some(signal) => {
            let outcome = if dir.join(CKPT).exists() {
                format!("nothing changed; continue with `sddpm-gpu train --resume {}`", dir.display())
            } else {
                format!("no checkpoint yet; `sddpm-gpu train --resume {}` starts it from step 0", dir.display())
            };
            signal::Interrupted { signal, outcome }.into()
        }
        None => e,
    })
}

/// The checks of a run on `ranks` ranks: the batch splits into equal shares and the BatchNorm
/// groups into whole groups per rank (each rank normalises its own share, as the reference's
/// DataParallel replicas do).
pub fn check_ranks(cfg: &RunConfig, ranks: usize) -> Result<()> {
    if let Net::Ddpm(c) = &cfg.model {
        if ranks > 1 && c.dropout > 0.0 {
            // Its masks are keyed by the element's index in the rank's share, not in the global
            // batch: N ranks would train on other masks than one process (not done yet).
            bail!(
                "training --model ddpm with dropout ({}) on {ranks} MPI ranks is not implemented yet (the dropout masks \
                 are not keyed by global image index); train it in one process",
                c.dropout
            );
        }
    }
    if !cfg.batch.is_multiple_of(ranks) {
        bail!("--batch {} must divide by the {ranks} ranks (the global batch is split into equal shares)", cfg.batch);
    }
    if !cfg.bn_groups.is_multiple_of(ranks) {
        bail!(
            "bn_groups (--bn-groups) {} must be a multiple of the {ranks} ranks (each rank normalises whole groups of the batch)",
            cfg.bn_groups
        );
    }
    Ok(())
}

fn train_locked(
    ctx: &Context,
    comm: &dyn Comm,
    cfg: &mut RunConfig,
    dir: &Path,
    resume: bool,
    started: &mut bool,
) -> Result<()> {
    let (lead, ranks) = (comm.rank() == 0, comm.size());
    let config_path = dir.join("config.json");
    cfg.validate().map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
    check_ranks(cfg, ranks)?;
    let share = crate::dist::share(cfg.batch, comm, "--batch")?;
    let ckpt_path = dir.join(CKPT);
    let start = if resume && ckpt_path.exists() {
        let ckpt = Checkpoint::load(&ckpt_path).with_context(|| format!("resuming {}", dir.display()))?;
        // Entries, counters and finiteness, as every command that reads a checkpoint checks them.
        ckpt.net(None)?;
        if ckpt.counter("optim.step")?.is_none() {
            bail!("{}: has no optim.step; not a checkpoint of a training run", ckpt_path.display());
        }
        let diff = cfg.differences(&ckpt)?;
        if !diff.is_empty() {
            bail!(
                "{}: {} ({}); restore config.json: a resumed run keeps its settings (only --steps may change)",
                config_path.display(),
                diff.join("; "),
                ckpt_path.display()
            );
        }
        ckpt
    } else {
        if resume {
            eprintln!("note: {} has no checkpoint yet; starting the run from step 0", dir.display());
        }
        cfg.model.init_weights(cfg.seed)
    };
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
    let first = start.counter("optim.step")?.unwrap_or(0);
    if first >= cfg.steps {
        if lead {
            println!("{} is already at step {first} of {}; nothing to do (raise --steps)", dir.display(), cfg.steps);
        }
        return Ok(());
    }
    let fid_ref = if cfg.fid_every > 0 && lead { Some(FidRef::load(cfg)?) } else { None };
    if lead {
        let ranks_note = if ranks > 1 {
            format!(" on {ranks} ranks ({} images each, BatchNorm over {} groups)", share.len(), cfg.bn_groups)
        } else if cfg.bn_groups > 1 {
            format!(" (BatchNorm over {} groups)", cfg.bn_groups)
        } else {
            String::new()
        };
        eprintln!(
            "training {} {} ({} parameters) on {}, batch {}{ranks_note}, steps {first}..{}, adapter {}",
            cfg.model.kind(),
            describe(cfg),
            cfg.model.parameter_count(),
            data.name,
            cfg.batch,
            cfg.steps,
            ctx.describe()
        );
        std::fs::create_dir_all(dir.join("samples")).with_context(|| format!("cannot create {}", dir.display()))?;
        if !resume {
            // Written before tuning, so even a killed run leaves a folder --resume can start.
            write_config(cfg, dir)?;
        }
    }
    if resume {
        crate::tune::tuning(ctx).lock().unwrap().pinned.extend(cfg.variants.clone());
        crate::tune::pin_recorded(ctx, &start.metadata, &ckpt_path.display().to_string())?;
    }
    let opts = TrainOptions {
        lr: cfg.lr,
        warmup: cfg.warmup,
        ema: cfg.ema,
        bn_groups: cfg.bn_groups / ranks,
        ranks,
        ..Default::default()
    };
    tune_ranks(ctx, comm, cfg, share.len(), &opts)?;
    let mut trainer = Trainer::new(ctx, &cfg.model, &start, share.len(), cfg.model.img_size(), opts)?;
    trainer.image_base = share.start;
    if ranks > 1 {
        // Every rank starts from the same state (the same seed's weights, or the same checkpoint).
        comm.check_same(trainer.param_checksum(ctx)?, "the initial parameters")?;
    } else {
        signal::check()?;
    }
    let mut log = None;
    let mut fid = None;
    if lead {
        // A resumed run's config.json changes only now that it is sure to run (--steps, variants).
        if record_variants(ctx, cfg) || resume {
            write_config(cfg, dir)?;
        }
        log = Some(LossLog::open(&dir.join("loss.csv"), first, "step,loss,lr,images_per_s")?);
        fid = fid_ref.map(|r| FidEval::new(ctx, r, cfg.fid.n, dir, first)).transpose()?;
    }
    let mut meta = HashMap::new();
    meta.insert(RUN_METADATA.to_string(), serde_json::to_string(&cfg.identity())?);

    let diffusion_steps = cfg.model.diffusion_steps();
    let loader =
        Loader::start_share(data.clone(), cfg.batch, share.clone(), cfg.seed, first, cfg.steps, diffusion_steps);
    let bar = if lead {
        Progress::with_template("train", cfg.steps, "steps", "{bar:30} {pos}/{len} steps  {msg}  eta {eta}")
    } else {
        Progress::hidden()
    };
    bar.start_at(first);
    let title = describe(cfg);
    let mut last = Instant::now();
    let diverged = |trainer: &Trainer, why: String| -> Result<()> {
        if !lead {
            return Err(crate::dist::SaidByRank0(1).into());
        }
        trainer.save_diverged(ctx, &dir.join(DIVERGED), meta.clone())?;
        bail!("{why} at step {}; state saved to {}", trainer.step, dir.join(DIVERGED).display())
    };
    while trainer.step < cfg.steps {
        let batch = loader.next().context("the data loader stopped")?;
        let stats = trainer.step_with(ctx, comm, &batch.x0, &batch.t, None, cfg.seed)?;
        *started = true;
        // Loss and grad norm are the global ones, the same on every rank: all stop here together.
        if !stats.loss.is_finite() || !stats.grad_norm.is_finite() {
            bar.abandon();
            return diverged(&trainer, format!("loss became {} (gradient norm {})", stats.loss, stats.grad_norm));
        }
        let ips = cfg.batch as f64 / last.elapsed().as_secs_f64();
        last = Instant::now();
        if let Some(log) = log.as_mut() {
            log.push(&format!("{},{},{},{ips:.3}", trainer.step, stats.loss, trainer.lr()), trainer.step, stats.loss)?;
        }
        bar.set_message(format!("loss {:.4}  |g| {:.3}  {:.2} img/s", stats.loss, stats.grad_norm, ips));
        bar.set_position(trainer.step);
        let step = trainer.step;
        // An interrupt on any rank stops every rank after this step (the latest signal's kind).
        let interrupted = match ranks {
            1 => signal::pending(),
            _ => signal::Signal::from_raw(comm.min_max(signal::Signal::raw(signal::pending()) as u64)?.1 as usize),
        };
        if interrupted.is_some() || (cfg.ckpt_every > 0 && step % cfg.ckpt_every == 0) || step == cfg.steps {
            if ranks > 1 {
                // What rank 0 saves is what every rank holds: a divergence is an error, never saved
                // silently (the previous checkpoint stays).
                comm.check_same(trainer.param_checksum(ctx)?, &format!("the parameters after step {step}"))?;
            }
            if let Some(log) = log.as_mut() {
                match trainer.save(ctx, &ckpt_path, meta.clone()) {
                    Err(e) if e.is::<NonFinite>() => {
                        bar.abandon();
                        return diverged(&trainer, e.to_string());
                    }
                    r => r?,
                }
                log.flush_plot(&dir.join("loss.png"), &title)?;
            }
        }
        if let Some(signal) = interrupted {
            bar.abandon();
            let outcome = match lead {
                true => format!(
                    "checkpoint of step {step} saved to {}; continue with `sddpm-gpu train --resume {}`",
                    ckpt_path.display(),
                    dir.display()
                ),
                false => String::new(),
            };
            let stop = signal::Interrupted { signal, outcome };
            return Err(if ranks > 1 { crate::dist::AllStopped(stop).into() } else { stop.into() });
        }
        if !lead {
            continue;
        }
        if cfg.sample_n > 0 && ((cfg.sample_every > 0 && step % cfg.sample_every == 0) || step == cfg.steps) {
            bar.suspend(|| sample_grid(ctx, &trainer, cfg, &dir.join("samples").join(format!("step_{step:07}.png"))))?;
            if record_variants(ctx, cfg) {
                write_config(cfg, dir)?;
            }
        }
        if let Some(f) = fid.as_mut().filter(|_| step % cfg.fid_every == 0) {
            bar.suspend(|| f.evaluate(ctx, &trainer, cfg, step))?;
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
///
/// Several ranks run the variants rank 0 chose: they must update their parameters with the same
/// kernels (another reduction order in the gradient norm would make the ranks drift apart).
fn tune_ranks(ctx: &Context, comm: &dyn Comm, cfg: &RunConfig, batch: usize, opts: &TrainOptions) -> Result<()> {
    if comm.rank() == 0 {
        tune_run(ctx, cfg, batch, opts)?;
    }
    if comm.size() == 1 {
        return Ok(());
    }
    let mut chosen = serde_json::to_vec(&crate::tune::tuning(ctx).lock().unwrap().chosen)?;
    comm.broadcast(&mut chosen)?;
    if comm.rank() != 0 {
        let chosen: BTreeMap<String, String> = serde_json::from_slice(&chosen)?;
        crate::tune::tuning(ctx).lock().unwrap().pinned.extend(chosen);
        tune_run(ctx, cfg, batch, opts)?;
    }
    Ok(())
}

fn tune_run(ctx: &Context, cfg: &RunConfig, batch: usize, opts: &TrainOptions) -> Result<()> {
    let size = cfg.model.img_size();
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

/// A CSV log (loss.csv, fid.csv) kept consistent with the checkpoint on resume: rows after the
/// resumed step are dropped.
struct LossLog {
    path: PathBuf,
    file: std::fs::File,
    points: Vec<(u64, f32)>,
}

impl LossLog {
    fn open(path: &Path, resume_step: u64, header: &str) -> Result<LossLog> {
        let mut kept = format!("{header}\n");
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
        let file = fsutil::create_atomic(path, kept.as_bytes())?;
        Ok(LossLog { path: path.to_path_buf(), file, points })
    }

    /// Append `row` (already formatted) and remember (step, value) for the plot.
    fn push(&mut self, row: &str, step: u64, value: f32) -> Result<()> {
        writeln!(self.file, "{row}").with_context(|| format!("writing {}", self.path.display()))?;
        self.points.push((step, value));
        Ok(())
    }

    fn flush_plot(&mut self, png: &Path, title: &str) -> Result<()> {
        self.file.flush()?;
        crate::plot::loss_plot(png, &self.points, &format!("sddpm-gpu: {title}"))
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
    log: LossLog,
    png: PathBuf,
}

impl FidEval {
    fn new(ctx: &Context, r: FidRef, n: usize, dir: &Path, first: u64) -> Result<FidEval> {
        let net = crate::fid::inception::Inception::new(ctx, &r.weights, n.min(8))?;
        let log = LossLog::open(&dir.join("fid.csv"), first, "step,fid,kid,kid_std")?;
        Ok(FidEval { net, reference: r.reference, log, png: dir.join("fid.png") })
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
        self.log.push(&format!("{step},{fid},{k},{ks}"), step, fid as f32)?;
        eprintln!("step {step}: FID {fid:.3}, KID {k:.5} ({n} samples, {} DDIM steps)", cfg.fid.steps);
        self.log.file.flush()?;
        crate::plot::series_plot(
            &self.png,
            &self.log.points,
            &format!("sddpm-gpu: {}: FID of {n} samples", describe(cfg)),
            "FID",
        )
    }
}

/// What `sddpm-gpu train-step` reads and writes (see [`train_step`]).
#[derive(Debug, Clone)]
pub struct TrainStepArgs {
    pub checkpoint: PathBuf,
    pub input: PathBuf,
    pub output: PathBuf,
    pub snn_steps: Option<usize>,
    pub lr: f32,
    /// BatchNorm groups of the global batch (None: one per rank, as data-parallel training).
    pub bn_groups: Option<usize>,
    /// Consecutive global batches in the input (`--steps`).
    pub steps: usize,
}

/// Training steps for parity checks: the input holds `x0` [K*B, C, H, W], `t` [K*B] and `noise`
/// for K = `steps` consecutive global batches of B images (step k: rows k*B..); they run in
/// order, one JSON line per step (`step`, `loss`, `grad_norm` before clipping, both global).
/// Under several ranks each takes its share of every batch (rows k*B + r*B/N..) and rank 0
/// alone writes the output checkpoint (weights, BN statistics, Adam state).
pub fn train_step(ctx: &Context, comm: &dyn crate::dist::Comm, a: &TrainStepArgs) -> Result<()> {
    // A training step continues the trained weights, never their EMA.
    let (ckpt, cfg) = crate::weights::open(&a.checkpoint, Some(crate::weights::Which::Raw), a.snn_steps)?;
    let inp = crate::checkpoint::TensorFile::load(&a.input)?;
    let x0 = inp.get_images("x0", cfg.img_ch())?;
    let shape = x0.shape.clone();
    let noise = inp.get("noise")?;
    if noise.shape != shape {
        bail!("{}: 'noise' must have the shape of 'x0' {:?}, got {:?}", a.input.display(), shape, noise.shape);
    }
    let t = inp.get_timesteps("t", shape[0], cfg.diffusion_steps())?;
    if a.steps == 0 || !shape[0].is_multiple_of(a.steps) {
        bail!(
            "--steps {}: {} holds {} images, not a whole number of batches for {} steps",
            a.steps,
            a.input.display(),
            shape[0],
            a.steps
        );
    }
    let batch = shape[0] / a.steps;
    let share = crate::dist::share(batch, comm, "the batch of")?;
    let ranks = comm.size();
    let groups = a.bn_groups.unwrap_or(ranks);
    if groups == 0 || !groups.is_multiple_of(ranks) {
        bail!("--bn-groups {groups} must be a multiple of the {ranks} ranks (each rank takes whole groups)");
    }
    let opts = TrainOptions { lr: a.lr, given_noise: true, bn_groups: groups / ranks, ranks, ..Default::default() };
    let mut trainer = Trainer::new(ctx, &cfg, &ckpt, share.len(), shape[2], opts)?;
    trainer.image_base = share.start;
    let per: usize = shape[1..].iter().product();
    for k in 0..a.steps {
        let rows = k * batch + share.start..k * batch + share.end;
        let images = rows.start * per..rows.end * per;
        let stats = trainer.step_with(ctx, comm, &x0.data[images.clone()], &t[rows], Some(&noise.data[images]), 0)?;
        if comm.rank() == 0 {
            println!("{}", serde_json::json!({ "step": k + 1, "loss": stats.loss, "grad_norm": stats.grad_norm }));
        }
    }
    if ranks > 1 {
        comm.check_same(trainer.param_checksum(ctx)?, "the parameters")?;
    }
    if comm.rank() == 0 {
        let mut meta = HashMap::new();
        if groups > 1 {
            meta.insert("bn_groups".to_string(), groups.to_string());
        }
        trainer.save(ctx, &a.output, meta)?;
    }
    Ok(())
}
