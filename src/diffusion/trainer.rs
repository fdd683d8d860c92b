//! One compiled training step on the GPU: q_sample (noise from Philox or given), the training-mode
//! U-Net, eps-MSE loss, reverse-mode backward, global gradient norm, clip + Adam on every
//! parameter, BatchNorm running statistics; all in one graph, replayed each step.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Result};

use super::Schedule;
use crate::checkpoint::{self, Checkpoint, Data};
use crate::dist::{Comm, Single};
use crate::gpu::Context;
use crate::graph::{backward, DType, Graph, Plan, TensorId};
use crate::model::{too_large, EntryKind, Net};
use crate::ops::batchnorm::BnGroups;
use crate::ops::optim::{self, Adam};
use crate::ops::{elementwise, reduce, sampler};

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub lr: f32,
    pub adam: Adam,
    /// Global gradient-norm clip (the reference's 1.0).
    pub max_norm: f32,
    /// Read the noise from the caller instead of generating it (train-step parity).
    pub given_noise: bool,
    /// Keep every parameter's gradient readable after a step (tests, train-step).
    pub keep_grads: bool,
    /// Linear learning-rate warmup over this many steps (0: none, as the reference).
    pub warmup: u64,
    /// Keep an exponential moving average of the weights with this decay (None: off, as the
    /// reference); saved as `ema.*` in checkpoints.
    pub ema: Option<f32>,
    /// BatchNorm statistics over this many groups of the batch (`--bn-groups`; 1: the whole
    /// batch): one device reproduces data-parallel training over as many replicas.
    pub bn_groups: usize,
    /// Ranks that train together (see crate::dist): above 1 the gradient arenas stay readable
    /// and [`Trainer::step_with`] averages them across ranks in buckets.
    pub ranks: usize,
}

/// Bytes of one gradient all-reduce bucket (PyTorch DDP's `bucket_cap_mb` = 25).
pub const BUCKET_BYTES: u64 = 25 << 20;

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            lr: 2e-4,
            adam: Adam::default(),
            max_norm: 1.0,
            given_noise: false,
            keep_grads: false,
            warmup: 0,
            ema: None,
            bn_groups: 1,
            ranks: 1,
        }
    }
}

/// What one step reports.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    pub loss: f32,
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f32,
}

pub struct Trainer {
    pub cfg: Net,
    pub batch: usize,
    pub size: usize,
    pub opts: TrainOptions,
    /// Optimizer steps taken so far (Adam's bias-correction count).
    pub step: u64,
    /// BatchNorm num_batches_tracked, by official name.
    pub counters: BTreeMap<String, i64>,
    pub plan: Plan,
    schedule: Schedule,
    x0: TensorId,
    qcoef: TensorId,
    t: TensorId,
    noise: Option<TensorId>,
    hyper: TensorId,
    /// The dropout masks' key (seed, step), when the net has dropout.
    dropout_key: Option<TensorId>,
    loss: TensorId,
    sumsq: TensorId,
    q_node: usize,
    x_numel: usize,
    /// Every state_dict tensor in the graph (parameters and running statistics), by name.
    pub state: BTreeMap<String, TensorId>,
    /// Adam moments (exp_avg, exp_avg_sq) of every trainable parameter, by parameter name.
    pub moments: BTreeMap<String, (TensorId, TensorId)>,
    /// Gradients by parameter name (readable when `keep_grads`).
    pub grads: BTreeMap<String, TensorId>,
    /// EMA weights by parameter name (when `ema` is on).
    pub ema: BTreeMap<String, TensorId>,
    /// Where parameters, gradients and moments live (see ops::optim): gradient order and
    /// all-reduce buckets for data-parallel training.
    pub arenas: optim::Arenas,
    /// The gradient buckets averaged across ranks, in the order the backward finishes them.
    pub buckets: Vec<optim::GradBucket>,
    opt_start: usize,
    /// Global index of this trainer's first image in every batch (a rank's share starts at
    /// rank * share): the generated noise is keyed by global image index.
    pub image_base: usize,
}

/// The tensors of a built training-step graph.
struct TrainGraph {
    g: Graph,
    x0: TensorId,
    qcoef: TensorId,
    t: TensorId,
    noise: Option<TensorId>,
    hyper: TensorId,
    one: TensorId,
    loss: TensorId,
    sumsq: TensorId,
    q_node: usize,
    unet: crate::model::UNet,
    moments: BTreeMap<String, (TensorId, TensorId)>,
    grads: BTreeMap<String, TensorId>,
    ema: BTreeMap<String, TensorId>,
    arenas: optim::Arenas,
    /// The first node of the optimizer step (gradient norm, clip + Adam): the gradients must be
    /// averaged across ranks before it.
    opt_start: usize,
}

/// The graph of one training step for batches of `batch` images of `size` px, without compiling
/// it (memory plans and dry runs). Fails on sizes too large to build, naming the flags.
pub fn train_graph(cfg: &Net, batch: usize, size: usize, opts: &TrainOptions) -> Result<Graph> {
    Ok(build_step(cfg, batch, size, opts)?.g)
}

/// [`train_graph`] with its optimizer arenas (layout, gradient order, all-reduce buckets).
pub fn train_graph_arenas(cfg: &Net, batch: usize, size: usize, opts: &TrainOptions) -> Result<(Graph, optim::Arenas)> {
    let s = build_step(cfg, batch, size, opts)?;
    Ok((s.g, s.arenas))
}

/// The training step's graph for another batch than `batch` (and that batch), from which tuning
/// keys learn which numbers follow the batch (crate::tune::Batched).
pub fn train_graph_other(cfg: &Net, batch: usize, size: usize, opts: &TrainOptions) -> Result<(Graph, usize)> {
    // BatchNorm groups must cut the other batch too: one group's worth less (or more).
    let other = match opts.bn_groups {
        0 | 1 => crate::tune::other_batch(batch),
        g if batch > g => batch - g,
        g => batch + g,
    };
    Ok((build_step(cfg, other, size, opts)?.g, other))
}

fn build_step(cfg: &Net, batch: usize, size: usize, opts: &TrainOptions) -> Result<TrainGraph> {
    cfg.validate_run(size, batch)?;
    let mut g = Graph::new();
    let x0 = g.input("x0", &[batch, cfg.img_ch(), size, size]);
    let qcoef = g.input("q_sample.coef", &[batch, 2]);
    let t = g.input_as("t", &[batch], DType::U32);
    let noise = opts.given_noise.then(|| g.input("noise", &[batch, cfg.img_ch(), size, size]));
    let hyper = g.input("optim.hyper", &[4]);
    let one = g.param("loss.seed", &[1]);
    let (x_t, noise_used, q_node) = sampler::q_sample(&mut g, qcoef, x0, noise);
    let bn_groups = BnGroups::new(opts.bn_groups, batch)?;
    let unet = cfg.build_train(&mut g, x_t, t, bn_groups)?;
    let loss = reduce::mse_loss(&mut g, unet.eps, noise_used, "loss");
    // Sizes too large to index stop here, before the backward doubles the graph.
    g.check().map_err(|e| too_large(e, cfg, batch, size))?;
    let entries = cfg.state_entries();
    let trainable: Vec<(&str, TensorId)> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Trainable)
        .map(|e| (e.name.as_str(), unet.params[&e.name]))
        .collect();
    let wrt: Vec<TensorId> = trainable.iter().map(|&(_, id)| id).collect();
    let grad_of = backward(&mut g, loss, one, &wrt, elementwise::add);
    let params: Vec<(String, TensorId, TensorId)> = trainable
        .iter()
        .map(|&(name, id)| {
            let grad = *grad_of.get(&id).unwrap_or_else(|| panic!("no gradient reaches {name}"));
            (name.to_string(), id, grad)
        })
        .collect();
    // Parameters, gradients and moments in arenas (see ops::optim): the norm and the update are
    // a few wide dispatches instead of two per tensor.
    let arenas = optim::arenas(&mut g, &params, opts.ema.is_some());
    let norm_inputs: Vec<(TensorId, TensorId)> = arenas.arenas.iter().map(|a| (a.grad, a.chunks)).collect();
    let opt_start = g.nodes.len();
    if opts.ranks > 1 {
        // Read back in buckets, averaged across ranks, written back before the optimizer.
        for a in &arenas.arenas {
            g.mark_output(a.grad);
        }
    }
    let sumsq = reduce::sumsq_arenas(&mut g, &norm_inputs, "grad_norm");
    optim::adam_arenas(&mut g, &opts.adam, &arenas, sumsq, hyper, "adam");
    if let Some(decay) = opts.ema {
        optim::ema_arenas(&mut g, &arenas, decay, "ema");
    }
    let by_name = |f: fn(&optim::Member) -> TensorId| -> BTreeMap<String, TensorId> {
        arenas.members.iter().map(|m| (m.name.clone(), f(m))).collect()
    };
    let grads = by_name(|m| m.grad);
    let moments = arenas.members.iter().map(|m| (m.name.clone(), (m.exp_avg, m.exp_avg_sq))).collect();
    let ema = arenas.members.iter().filter_map(|m| Some((m.name.clone(), m.ema?))).collect();
    g.mark_output(loss);
    g.mark_output(sumsq);
    if opts.keep_grads {
        for &grad in grads.values() {
            g.mark_output(grad);
        }
    }
    g.check().map_err(|e| too_large(e, cfg, batch, size))?;
    Ok(TrainGraph {
        g,
        x0,
        qcoef,
        t,
        noise,
        hyper,
        one,
        loss,
        sumsq,
        q_node,
        unet,
        moments,
        grads,
        ema,
        arenas,
        opt_start,
    })
}

impl Trainer {
    /// Compile a training step for batches of `batch` images of `size` px, starting from
    /// `ckpt` (weights, and optimizer state if it has `optim.*`).
    pub fn new(
        ctx: &Context,
        cfg: impl Into<Net>,
        ckpt: &Checkpoint,
        batch: usize,
        size: usize,
        opts: TrainOptions,
    ) -> Result<Trainer> {
        let cfg: Net = cfg.into();
        let TrainGraph {
            g,
            x0,
            qcoef,
            t,
            noise,
            hyper,
            one,
            loss,
            sumsq,
            q_node,
            unet,
            moments,
            grads,
            ema,
            arenas,
            opt_start,
        } = build_step(&cfg, batch, size, &opts)?;
        let buckets = arenas.grad_buckets(BUCKET_BYTES);
        let entries = cfg.state_entries();
        let x_numel = g.info(x0).numel();
        let (other, other_batch) = train_graph_other(&cfg, batch, size, &opts)?;
        let plan =
            crate::tune::compile_batched(ctx, crate::tune::Batched { graph: &g, batch, other: &other, other_batch })?;
        plan.write(ctx, one, &[1f32])?;
        unet.upload(ctx, &plan, ckpt)?;
        let step = ckpt.counter("optim.step")?.unwrap_or(0);
        for (name, &(m, v)) in &moments {
            let (mk, vk) = (format!("optim.{name}.exp_avg"), format!("optim.{name}.exp_avg_sq"));
            match (ckpt.tensors.get(&mk), ckpt.tensors.get(&vk)) {
                (Some(mt), Some(vt)) if step > 0 => {
                    let want = g.shape(m);
                    if let Some((k, t)) = [(&mk, mt), (&vk, vt)].into_iter().find(|(_, t)| t.shape != want) {
                        bail!(
                            "{}: '{k}' is {:?} but the model's '{name}' is {want:?}; the optimizer state is not this model's",
                            ckpt.path.display(),
                            t.shape
                        );
                    }
                    plan.write(ctx, m, &mt.data)?;
                    plan.write(ctx, v, &vt.data)?;
                }
                _ if step > 0 => bail!("{}: has optim.step but no {mk} / {vk}", ckpt.path.display()),
                _ => {
                    let zeros = vec![0f32; g.info(m).numel()];
                    plan.write(ctx, m, &zeros)?;
                    plan.write(ctx, v, &zeros)?;
                }
            }
        }
        for (name, &e) in &ema {
            let src = ckpt.tensors.get(&format!("ema.{name}")).unwrap_or(ckpt.get(name)?);
            if src.shape != g.shape(e) {
                bail!("{}: 'ema.{name}' is {:?}, expected {:?}", ckpt.path.display(), src.shape, g.shape(e));
            }
            plan.write(ctx, e, &src.data)?;
        }
        let mut counters = BTreeMap::new();
        for e in entries.iter().filter(|e| e.kind == EntryKind::Counter) {
            // counter() checked the value is a non-negative i64.
            counters.insert(e.name.clone(), ckpt.counter(&e.name)?.unwrap_or(0) as i64);
        }
        let schedule = Schedule::reference(cfg.diffusion_steps());
        Ok(Trainer {
            cfg,
            batch,
            size,
            opts,
            step,
            counters,
            plan,
            schedule,
            x0,
            qcoef,
            t,
            noise,
            hyper,
            dropout_key: unet.dropout_key,
            loss,
            sumsq,
            q_node,
            x_numel,
            state: unet.params,
            moments,
            grads,
            ema,
            arenas,
            buckets,
            opt_start,
            image_base: 0,
        })
    }

    /// One optimizer step on x0 [B, C, H, W] at timesteps t; `noise` is required exactly when
    /// the trainer was built with `given_noise`, otherwise noise comes from (seed, step).
    pub fn step(
        &mut self,
        ctx: &Context,
        x0: &[f32],
        t: &[u32],
        noise: Option<&[f32]>,
        seed: u64,
    ) -> Result<StepStats> {
        self.step_with(ctx, &Single, x0, t, noise, seed)
    }

    /// [`Trainer::step`] on this rank's share of a global batch, the ranks of `comm` training one
    /// model: the backward is submitted in segments that end where a gradient bucket is final;
    /// each bucket is read back and its sum across ranks started at once (non-blocking) while the
    /// next segment runs; the averaged gradients are written back before the optimizer step,
    /// which then clips and updates alike on every rank. Loss and grad norm are the global ones.
    pub fn step_with(
        &mut self,
        ctx: &Context,
        comm: &dyn Comm,
        x0: &[f32],
        t: &[u32],
        noise: Option<&[f32]>,
        seed: u64,
    ) -> Result<StepStats> {
        if t.len() != self.batch {
            bail!("expected {} timesteps, got {}", self.batch, t.len());
        }
        if comm.size() != self.opts.ranks {
            bail!("the trainer was built for {} ranks, not {}", self.opts.ranks, comm.size());
        }
        if let Some(&bad) = t.iter().find(|&&v| v as usize >= self.cfg.diffusion_steps()) {
            bail!("timestep {bad} is outside 0..{}", self.cfg.diffusion_steps());
        }
        // The reference's extract(): f64 sqrt(abar) and sqrt(1 - abar), cast to f32.
        let ab = &self.schedule.alphas_bar;
        let coef: Vec<f32> =
            t.iter().flat_map(|&s| [ab[s as usize].sqrt() as f32, (1.0 - ab[s as usize]).sqrt() as f32]).collect();
        self.plan.write(ctx, self.x0, x0)?;
        self.plan.write(ctx, self.qcoef, &coef)?;
        self.plan.write(ctx, self.t, t)?;
        match (self.noise, noise) {
            (Some(id), Some(data)) => self.plan.write(ctx, id, data)?,
            (None, None) => {}
            _ => bail!("noise must be given exactly when the trainer was built with given_noise"),
        }
        self.step += 1;
        let hyper = optim::hyper(&self.opts.adam, self.lr(), self.step, self.opts.max_norm);
        self.plan.write(ctx, self.hyper, &hyper)?;
        if let Some(key) = self.dropout_key {
            self.plan.write(ctx, key, &crate::ops::dropout::key_words(seed, self.step as u32))?;
        }
        let q = sampler::q_sample_params_at(
            self.x_numel,
            self.batch,
            seed,
            self.step as u32,
            self.noise.is_some(),
            self.image_base,
        );
        self.plan.set_params(ctx, self.q_node, &q);
        if comm.size() == 1 {
            self.plan.run(ctx)?;
        } else {
            self.exchange(ctx, comm)?;
        }
        for c in self.counters.values_mut() {
            *c += 1;
        }
        let mut loss = self.plan.read(ctx, self.loss)?[0];
        if comm.size() > 1 {
            // Equal shares: the global batch's mean loss is the mean of the ranks'.
            loss = comm.sum(&[loss])?[0] / comm.size() as f32;
        }
        let sumsq = self.plan.read(ctx, self.sumsq)?[0];
        Ok(StepStats { loss, grad_norm: sumsq.sqrt() })
    }

    /// The step in segments with the gradients averaged across ranks (see [`Trainer::step_with`]).
    /// Napkin math: cifar10's 267 MB of gradients in ~11 buckets of 25 MB; each rank moves
    /// 2 (N - 1) / N of it per step in a ring all-reduce, plus a device-to-host and a
    /// host-to-device copy of all of it.
    fn exchange(&self, ctx: &Context, comm: &dyn Comm) -> Result<()> {
        let sizes: Vec<usize> = self.buckets.iter().map(|b| (b.bytes / 4) as usize).collect();
        let scale = 1.0 / comm.size() as f32;
        let mut next = 0;
        let plan = &self.plan;
        comm.sum_pipelined(
            &sizes,
            &mut |k, buf| {
                let b = &self.buckets[k];
                if b.ready_after >= next {
                    plan.run_nodes(ctx, next..b.ready_after + 1)?;
                    next = b.ready_after + 1;
                }
                buf.copy_from_slice(&plan.read_range(ctx, b.tensor, b.offset, b.bytes)?);
                Ok(())
            },
            &mut |k, sums| {
                let b = &self.buckets[k];
                let mean: Vec<f32> = sums.iter().map(|v| v * scale).collect();
                plan.write_range(ctx, b.tensor, b.offset, &mean)
            },
        )?;
        assert!(next <= self.opt_start, "a gradient bucket is final only after the optimizer started");
        plan.run_nodes(ctx, next..plan.nodes().len())?;
        Ok(())
    }

    /// A checksum of every trainable parameter (their arenas' bits), to compare across ranks.
    pub fn param_checksum(&self, ctx: &Context) -> Result<u64> {
        let mut data = Vec::new();
        for a in &self.arenas.arenas {
            data.push(self.plan.read(ctx, a.param)?);
        }
        Ok(crate::dist::checksum(data.iter().map(|d| d.as_slice())))
    }

    /// The learning rate of the current step (after warmup).
    pub fn lr(&self) -> f32 {
        if self.opts.warmup == 0 {
            return self.opts.lr;
        }
        self.opts.lr * (self.step.max(1).min(self.opts.warmup) as f32 / self.opts.warmup as f32)
    }

    /// The current weights (and running statistics) as an in-memory checkpoint, for sampling;
    /// with `ema`, the EMA weights replace the trained ones.
    pub fn weights(&self, ctx: &Context, ema: bool) -> Result<Checkpoint> {
        let mut tensors = BTreeMap::new();
        for e in self.cfg.state_entries().into_iter().filter(|e| e.kind != EntryKind::Counter) {
            let id = if ema { *self.ema.get(&e.name).unwrap_or(&self.state[&e.name]) } else { self.state[&e.name] };
            tensors.insert(e.name.clone(), checkpoint::Tensor { shape: e.shape, data: self.plan.read(ctx, id)? });
        }
        let mut metadata = HashMap::new();
        metadata.insert("config".into(), self.cfg.config_json());
        Ok(Checkpoint {
            path: format!("<training step {}>", self.step).into(),
            tensors,
            ints: Default::default(),
            metadata,
        })
    }

    /// Read a parameter's gradient from the last step (needs `keep_grads`).
    pub fn grad(&self, ctx: &Context, name: &str) -> Result<Vec<f32>> {
        self.plan.read(ctx, self.grads[name])
    }

    /// Read a state_dict tensor (parameter or running statistic) by name.
    pub fn read_state(&self, ctx: &Context, name: &str) -> Result<Vec<f32>> {
        self.plan.read(ctx, self.state[name])
    }

    /// Write the full training state (weights, running statistics, counters, Adam moments and
    /// step) as a checkpoint, atomically. `meta` adds metadata entries. A state holding NaN or
    /// infinity is not written: the error is a [`NonFinite`] (see [`Trainer::save_diverged`]).
    pub fn save(&self, ctx: &Context, path: &std::path::Path, meta: HashMap<String, String>) -> Result<()> {
        self.write_state(ctx, path, meta, true)
    }

    /// [`Trainer::save`] whatever the state holds (a diverged run's state, for inspection).
    pub fn save_diverged(&self, ctx: &Context, path: &std::path::Path, meta: HashMap<String, String>) -> Result<()> {
        self.write_state(ctx, path, meta, false)
    }

    fn write_state(
        &self,
        ctx: &Context,
        path: &std::path::Path,
        meta: HashMap<String, String>,
        finite: bool,
    ) -> Result<()> {
        let mut floats: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for e in self.cfg.state_entries() {
            if e.kind != EntryKind::Counter {
                floats.push((e.name.clone(), e.shape.clone(), self.plan.read(ctx, self.state[&e.name])?));
            }
        }
        for (name, &(m, v)) in &self.moments {
            let shape = e_shape(&self.cfg, name);
            floats.push((format!("optim.{name}.exp_avg"), shape.clone(), self.plan.read(ctx, m)?));
            floats.push((format!("optim.{name}.exp_avg_sq"), shape, self.plan.read(ctx, v)?));
        }
        for (name, &e) in &self.ema {
            floats.push((format!("ema.{name}"), e_shape(&self.cfg, name), self.plan.read(ctx, e)?));
        }
        if finite {
            if let Some((name, _, data)) = floats.iter().find(|(_, _, d)| d.iter().any(|v| !v.is_finite())) {
                let bad = data.iter().find(|v| !v.is_finite()).expect("found above");
                return Err(NonFinite(format!("'{name}' holds {bad} after step {}", self.step)).into());
            }
        }
        let ints: Vec<(String, [i64; 1])> = self
            .counters
            .iter()
            .map(|(k, &v)| (k.clone(), [v]))
            .chain([("optim.step".into(), [self.step as i64])])
            .collect();
        let mut tensors: Vec<(String, Vec<usize>, Data)> =
            floats.iter().map(|(n, s, d)| (n.clone(), s.clone(), Data::F32(d))).collect();
        for (name, v) in &ints {
            let shape = if name == "optim.step" { vec![1] } else { vec![] };
            tensors.push((name.clone(), shape, Data::I64(v)));
        }
        let mut metadata = meta;
        metadata.insert("config".into(), self.cfg.config_json());
        if let Some(record) = crate::tune::record_json(ctx) {
            metadata.insert(crate::tune::METADATA_KEY.into(), record);
        }
        checkpoint::save(path, tensors, metadata)
    }
}

/// The training state holds NaN or infinity (the message names a tensor): the run diverged.
#[derive(Debug)]
pub struct NonFinite(pub String);

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the training state is not finite: {}", self.0)
    }
}

impl std::error::Error for NonFinite {}

fn e_shape(cfg: &Net, name: &str) -> Vec<usize> {
    cfg.state_entries().into_iter().find(|e| e.name == name).map(|e| e.shape).unwrap_or_default()
}
