//! The optimizer step: global gradient-norm clip and Adam (and the EMA of the weights), over
//! arenas of many tensors in a few dispatches ([`arenas`], [`adam_arenas`], [`ema_arenas`]), or
//! over one tensor per dispatch ([`adam_step`], [`ema_update`]).
//!
//! # The optimizer arenas
//!
//! [`arenas`] places every trainable parameter, its gradient, its two Adam moments (and its EMA
//! weights) in arenas (src/graph/arena.rs) that share one layout, so element i of the parameter
//! arena, the gradient arena and the moment arenas belong to the same weight:
//!
//! - Members are ordered by when the backward completes their gradient (the index of the last
//!   node writing it), earliest first: a prefix of the gradient arena is final while the
//!   backward still runs ([`Arenas::grad_buckets`] cuts it into byte ranges to all-reduce, each
//!   with the node after which it is complete; node indices are the graph's, which a compiled
//!   [`crate::graph::Plan`] keeps).
//! - Each member starts at a multiple of 256 bytes; the padding up to the next member holds no
//!   data (kernels never read it as data; it may hold anything, and summing it over ranks with a
//!   bucket is harmless).
//! - An arena holds at most [`crate::graph::ARENA_MAX_BYTES`] (128 MiB, what every adapter binds):
//!   as few arenas as that allows, split evenly; the cifar10 net's 66.6 M weights (254 MiB) take
//!   3 of each kind.
//! - The gradient arena is an intermediate (planned by liveness: it lives from the first
//!   gradient written to the optimizer step); parameters, moments and EMA weights persist.
//!
//! Tensor names, shapes and checkpoints are unchanged: every member keeps its own tensor id,
//! readable and writable alone.

use std::collections::BTreeMap;
use std::ops::Range;

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{
    grid_1d, size_u32, split_members, Cost, DType, Graph, Layout, Node, Params, Role, TensorId, ARENA_CHUNK,
    ARENA_MAX_BYTES,
};
use crate::shader;

pub static SHADER: Shader = shader!(trusted "optim");

/// Uniform parameters of `adam` and `ema_update` (WGSL `Params`): `n` values; Adam's betas and
/// eps, or the EMA decay in `beta1`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct OptimParams {
    pub n: u32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub _pad3: u32,
}

/// Parameters over `n` values, constants zero.
fn flat(n: usize) -> OptimParams {
    OptimParams { n: size_u32(n), _pad0: 0, _pad1: 0, _pad2: 0, beta1: 0.0, beta2: 0.0, eps: 0.0, _pad3: 0 }
}

/// Adam's constants (PyTorch defaults as the reference uses them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adam {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl Default for Adam {
    fn default() -> Self {
        Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// The per-step `hyper` tensor: [lr, 1 - beta1^step, sqrt(1 - beta2^step), max_norm].
pub fn hyper(adam: &Adam, lr: f32, step: u64, max_norm: f32) -> [f32; 4] {
    let bc1 = 1.0 - (adam.beta1 as f64).powi(step as i32);
    let bc2 = 1.0 - (adam.beta2 as f64).powi(step as i32);
    [lr, bc1 as f32, bc2.sqrt() as f32, max_norm]
}

/// Clip by the global norm in `sumsq` and take one Adam step on `param` (in place, with its
/// moments `m` and `v`).
#[allow(clippy::too_many_arguments)]
pub fn adam_step(
    g: &mut Graph,
    adam: &Adam,
    param: TensorId,
    grad: TensorId,
    m: TensorId,
    v: TensorId,
    sumsq: TensorId,
    hyper: TensorId,
    name: &str,
) {
    let n = g.info(param).numel();
    assert!(g.info(grad).numel() == n && g.info(m).numel() == n && g.info(v).numel() == n, "{name}: shapes differ");
    g.push(Node {
        shader: &SHADER,
        entry: "adam",
        params: Params::of(&OptimParams { beta1: adam.beta1, beta2: adam.beta2, eps: adam.eps, ..flat(n) }),
        reads: vec![grad, sumsq, hyper],
        writes: vec![param, m, v],
        workgroups: grid_1d(n, 256),
        label: name.to_string(),
        cost: Cost { flops: 14 * n as u64, bytes: 28 * n as u64 },
    });
}

/// CPU reference of [`adam_step`] on one tensor.
pub fn adam_cpu(
    adam: &Adam,
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    sumsq: f32,
    hyper: [f32; 4],
) {
    let [lr, bc1, bc2_sqrt, max_norm] = hyper;
    let clip = (max_norm / (sumsq.sqrt() + 1e-6)).min(1.0);
    for i in 0..param.len() {
        let gr = grad[i] * clip;
        m[i] = adam.beta1 * m[i] + (1.0 - adam.beta1) * gr;
        v[i] = adam.beta2 * v[i] + (1.0 - adam.beta2) * gr * gr;
        let denom = v[i].sqrt() / bc2_sqrt + adam.eps;
        param[i] -= (lr / bc1) * m[i] / denom;
    }
}

/// ema = decay * ema + (1 - decay) * param.
pub fn ema_update(g: &mut Graph, param: TensorId, ema: TensorId, decay: f32, name: &str) {
    let n = g.info(param).numel();
    g.push(Node {
        shader: &SHADER,
        entry: "ema_update",
        params: Params::of(&OptimParams { beta1: decay, ..flat(n) }),
        reads: vec![param],
        writes: vec![ema],
        workgroups: grid_1d(n, 256),
        label: name.to_string(),
        cost: Cost { flops: 3 * n as u64, bytes: 12 * n as u64 },
    });
}

/// One trainable tensor in the optimizer arenas.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub param: TensorId,
    pub grad: TensorId,
    pub exp_avg: TensorId,
    pub exp_avg_sq: TensorId,
    pub ema: Option<TensorId>,
    /// Which arena of [`Arenas::arenas`] holds it, at which element offset, with how many elements.
    pub arena: usize,
    pub offset: usize,
    pub len: usize,
    /// Index of the last node writing its gradient: after it the gradient is final.
    pub ready_after: usize,
}

/// One group of arenas at a shared layout: parameters, gradients, Adam moments (and EMA
/// weights) of consecutive [`Arenas::members`], with the chunk table of the layout.
#[derive(Debug, Clone)]
pub struct ArenaSet {
    pub layout: Layout,
    /// The members it holds (indices into [`Arenas::members`]).
    pub members: Range<usize>,
    pub param: TensorId,
    pub grad: TensorId,
    pub exp_avg: TensorId,
    pub exp_avg_sq: TensorId,
    pub ema: Option<TensorId>,
    /// [chunks, 2] u32: (start, len) of every chunk of [`ARENA_CHUNK`] elements.
    pub chunks: TensorId,
}

/// The optimizer state of a training step in arenas (see the module comment).
#[derive(Debug, Clone)]
pub struct Arenas {
    /// Every trainable tensor, in gradient order.
    pub members: Vec<Member>,
    pub arenas: Vec<ArenaSet>,
}

/// A byte range of one gradient arena that is final after node `ready_after`: what a
/// data-parallel step may all-reduce while the backward goes on. Ranges cover whole members and
/// the padding between them (which holds no data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GradBucket {
    pub arena: usize,
    /// The gradient arena tensor ([`ArenaSet::grad`]) and the byte range in it.
    pub tensor: TensorId,
    pub offset: u64,
    pub bytes: u64,
    pub ready_after: usize,
    /// The members it covers (indices into [`Arenas::members`]).
    pub members: Range<usize>,
}

impl Arenas {
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    /// The gradient arenas cut, in gradient order, into ranges of whole members of at most
    /// `max_bytes` each (a larger member stands alone); a range never spans two arenas. Each
    /// range is final after its `ready_after` node (the last of its members').
    pub fn grad_buckets(&self, max_bytes: u64) -> Vec<GradBucket> {
        let mut out = Vec::new();
        for (a, set) in self.arenas.iter().enumerate() {
            let members = &self.members[set.members.clone()];
            let lens: Vec<usize> = members.iter().map(|m| m.len).collect();
            for r in split_members(&lens, max_bytes) {
                let (first, last) = (&members[r.start], &members[r.end - 1]);
                let offset = 4 * first.offset as u64;
                out.push(GradBucket {
                    arena: a,
                    tensor: set.grad,
                    offset,
                    bytes: 4 * (last.offset + last.len) as u64 - offset,
                    ready_after: members[r.clone()].iter().map(|m| m.ready_after).max().unwrap_or(0),
                    members: set.members.start + r.start..set.members.start + r.end,
                });
            }
        }
        out
    }
}

/// Place the trainable tensors `params` (name, parameter, its gradient from
/// [`crate::graph::backward`]) and new Adam moments (`optim.{name}.exp_avg`, `.exp_avg_sq`, and
/// with `ema` the EMA weights `ema.{name}`) in arenas (see the module comment). Each gradient must
/// be an f32 intermediate of its own.
pub fn arenas(g: &mut Graph, params: &[(String, TensorId, TensorId)], ema: bool) -> Arenas {
    arenas_capped(g, params, ema, ARENA_MAX_BYTES)
}

/// [`arenas`] with arenas of at most `max_bytes` (tests use small ones to get several).
pub fn arenas_capped(g: &mut Graph, params: &[(String, TensorId, TensorId)], ema: bool, max_bytes: u64) -> Arenas {
    let mut last_write = BTreeMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for &w in &n.writes {
            last_write.insert(w, i);
        }
    }
    let mut order: Vec<(usize, &(String, TensorId, TensorId))> = params
        .iter()
        .map(|p| {
            let ready = *last_write.get(&p.2).unwrap_or_else(|| panic!("no node writes the gradient of {}", p.0));
            (ready, p)
        })
        .collect();
    order.sort_by_key(|&(ready, _)| ready);
    let mut seen = std::collections::BTreeSet::new();
    for (_, (name, _, grad)) in &order {
        let info = g.info(*grad);
        assert!(
            info.role == Role::Intermediate && info.dtype == DType::F32 && seen.insert(*grad),
            "the gradient of {name} ('{}') must be an f32 intermediate of its own to live in the gradient arena",
            info.name
        );
    }
    let lens: Vec<usize> = order.iter().map(|(_, p)| g.info(p.1).numel()).collect();
    let mut members = Vec::with_capacity(order.len());
    let mut sets = Vec::new();
    for (a, range) in split_members(&lens, max_bytes).into_iter().enumerate() {
        let layout = Layout::packed(&lens[range.clone()]);
        let start = members.len();
        for (k, &(ready, (name, param, grad))) in order[range.clone()].iter().enumerate() {
            let shape = g.shape(*param).to_vec();
            let exp_avg = g.param(&format!("optim.{name}.exp_avg"), &shape);
            let exp_avg_sq = g.param(&format!("optim.{name}.exp_avg_sq"), &shape);
            let ema = ema.then(|| g.param(&format!("ema.{name}"), &shape));
            members.push(Member {
                name: name.clone(),
                param: *param,
                grad: *grad,
                exp_avg,
                exp_avg_sq,
                ema,
                arena: a,
                offset: layout.offsets[k],
                len: layout.lens[k],
                ready_after: ready,
            });
        }
        let ms = &members[start..];
        let of = |f: fn(&Member) -> TensorId| ms.iter().map(f).collect::<Vec<_>>();
        let (params, grads, m, v) = (of(|m| m.param), of(|m| m.grad), of(|m| m.exp_avg), of(|m| m.exp_avg_sq));
        let param = g.arena(&format!("optim.arena{a}.param"), Role::Param, &params, &layout);
        let grad = g.arena(&format!("optim.arena{a}.grad"), Role::Intermediate, &grads, &layout);
        let exp_avg = g.arena(&format!("optim.arena{a}.exp_avg"), Role::Param, &m, &layout);
        let exp_avg_sq = g.arena(&format!("optim.arena{a}.exp_avg_sq"), Role::Param, &v, &layout);
        let ema = ema.then(|| {
            let e: Vec<TensorId> = ms.iter().map(|m| m.ema.expect("ema member")).collect();
            g.arena(&format!("optim.arena{a}.ema"), Role::Param, &e, &layout)
        });
        let table = layout.chunks(ARENA_CHUNK);
        let chunks = g.constant_u32(&format!("optim.arena{a}.chunks"), &[table.len(), 2], table.concat());
        sets.push(ArenaSet { layout, members: start..members.len(), param, grad, exp_avg, exp_avg_sq, ema, chunks });
    }
    Arenas { members, arenas: sets }
}

/// Clip by the global norm in `sumsq` and take one Adam step on every arena of `arenas`: one
/// dispatch per arena, one workgroup per chunk.
pub fn adam_arenas(g: &mut Graph, adam: &Adam, arenas: &Arenas, sumsq: TensorId, hyper: TensorId, name: &str) {
    for (a, set) in arenas.arenas.iter().enumerate() {
        let chunks = g.shape(set.chunks)[0];
        let n: usize = set.layout.lens.iter().sum();
        g.push_typed(
            Node {
                shader: &SHADER,
                entry: "adam_arena",
                params: Params::of(&OptimParams {
                    beta1: adam.beta1,
                    beta2: adam.beta2,
                    eps: adam.eps,
                    ..flat(chunks)
                }),
                reads: vec![set.grad, sumsq, hyper, set.chunks],
                writes: vec![set.param, set.exp_avg, set.exp_avg_sq],
                workgroups: grid_1d(chunks, 1),
                label: format!("{name}.arena{a}"),
                cost: Cost { flops: 14 * n as u64, bytes: 28 * n as u64 + 8 * chunks as u64 },
            },
            &[DType::F32, DType::F32, DType::F32, DType::U32],
            &[DType::F32; 3],
        );
    }
}

/// ema = decay * ema + (1 - decay) * param over every arena of `arenas` (built with `ema`).
pub fn ema_arenas(g: &mut Graph, arenas: &Arenas, decay: f32, name: &str) {
    for (a, set) in arenas.arenas.iter().enumerate() {
        let ema = set.ema.expect("ema_arenas on arenas built without EMA weights");
        let chunks = g.shape(set.chunks)[0];
        let n: usize = set.layout.lens.iter().sum();
        g.push_typed(
            Node {
                shader: &SHADER,
                entry: "ema_arena",
                params: Params::of(&OptimParams { beta1: decay, ..flat(chunks) }),
                reads: vec![set.param, set.chunks],
                writes: vec![ema],
                workgroups: grid_1d(chunks, 1),
                label: format!("{name}.arena{a}"),
                cost: Cost { flops: 3 * n as u64, bytes: 12 * n as u64 + 8 * chunks as u64 },
            },
            &[DType::F32, DType::U32],
            &[DType::F32],
        );
    }
}

/// CPU reference of [`ema_update`] and [`ema_arenas`] on one tensor.
pub fn ema_cpu(ema: &mut [f32], param: &[f32], decay: f32) {
    for (e, &w) in ema.iter_mut().zip(param) {
        *e = decay * *e + (1.0 - decay) * w;
    }
}
