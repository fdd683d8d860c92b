//! BatchNorm2d over [N, C, H, W] with N = T*B (the reference folds spiking time into the batch):
//! inference with running statistics, and training with batch statistics and the running update.

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{grid_1d, size_u32, Cost, Graph, Layout, Node, Params, PartialSums, Role, TensorId};
use crate::ops::{pointwise_cost, reduce};
use crate::shader;

pub static SHADER: Shader = shader!(trusted "batchnorm", uses "tree_sum");

pub const EPS: f32 = 1e-5;
pub const MOMENTUM: f32 = 0.1;

/// The tensors of one BatchNorm2d layer (official names: weight, bias, running_mean, running_var).
#[derive(Debug, Clone, Copy)]
pub struct BnParams {
    pub weight: TensorId,
    pub bias: TensorId,
    pub running_mean: TensorId,
    pub running_var: TensorId,
    /// How the training statistics cut the batch (eval ignores it).
    pub groups: BnGroups,
}

/// BatchNorm groups of a training batch (`--bn-groups`): the `batch` images of every spiking step
/// cut into `count` groups of `batch / count` consecutive images, each normalised by its own mean
/// and variance over its images across all T steps, as one data-parallel replica normalises its
/// share of the global batch; running statistics follow group 0 (replica 0's, as
/// nn.DataParallel and DDP's broadcast_buffers give). [`BnGroups::ONE`]: plain BatchNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BnGroups {
    pub count: usize,
    /// Images per spiking step (B of N = T*B); unused with one group.
    pub batch: usize,
}

impl BnGroups {
    pub const ONE: BnGroups = BnGroups { count: 1, batch: 0 };

    /// `count` groups of a batch of `batch` images; `count` must divide `batch`.
    pub fn new(count: usize, batch: usize) -> anyhow::Result<BnGroups> {
        if count == 0 || batch == 0 || !batch.is_multiple_of(count) {
            anyhow::bail!("--bn-groups {count} must be at least 1 and divide the batch of {batch} images");
        }
        Ok(if count == 1 { BnGroups::ONE } else { BnGroups { count, batch } })
    }

    /// Group of sample `s` of N = T*B (image s % B of its step).
    pub fn of_sample(&self, s: usize) -> usize {
        if self.count == 1 {
            0
        } else {
            (s % self.batch) / (self.batch / self.count)
        }
    }
}

/// What training-mode BN saves for backward: the batch mean and invstd per channel, and weight *
/// invstd, the three members of one arena `stats` (the backward binds them as one).
#[derive(Debug, Clone, Copy)]
pub struct BnSaved {
    pub mean: TensorId,
    pub invstd: TensorId,
    pub stats: TensorId,
}

fn dims(g: &Graph, x: TensorId, name: &str) -> (usize, usize, usize) {
    let s = g.shape(x);
    assert!(s.len() >= 2, "{name}: BatchNorm input must be [N, C, ...], got {s:?}");
    (s[0], s[1], s[2..].iter().product())
}

/// Uniform parameters of every batchnorm.wgsl entry (WGSL `Params`): `n` samples of `c` channels
/// of `hw` values; `groups` BatchNorm groups of `batch` images per spiking step (1 and n: plain
/// BatchNorm); `slices` of the training reductions (see shaders/batchnorm.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BatchnormParams {
    pub n: u32,
    pub c: u32,
    pub hw: u32,
    pub groups: u32,
    pub eps: f32,
    pub momentum: f32,
    pub batch: u32,
    pub slices: u32,
}

fn params(n: usize, c: usize, hw: usize) -> Vec<u32> {
    sliced_params(n, c, hw, BnGroups::ONE, 1)
}

fn sliced_params(n: usize, c: usize, hw: usize, groups: BnGroups, slices: usize) -> Vec<u32> {
    let u = size_u32;
    let (count, batch) = if groups.count == 1 { (1, n) } else { (groups.count, groups.batch) };
    Params::of(&BatchnormParams {
        n: u(n),
        c: u(c),
        hw: u(hw),
        groups: u(count),
        eps: EPS,
        momentum: MOMENTUM,
        batch: u(batch),
        slices: u(slices),
    })
}

/// The parameters of the per-element kernels of a training BN (apply, fused Swish backward),
/// which read the statistics of each element's group.
fn apply_params(n: usize, c: usize, hw: usize, groups: BnGroups) -> Vec<u32> {
    sliced_params(n, c, hw, groups, 1)
}

/// Slices per channel of the training reductions over [N, C, HW]: as `reduce::group_sum` cuts
/// the same values (so that BN's backward can leave channel sums group_sum would have computed).
pub fn slices(n: usize, c: usize, hw: usize) -> usize {
    reduce::group_slices(c, n * hw)
}

/// [`slices`] per (group, channel) of `groups`: each group's values are N / G * HW.
pub fn group_slices(n: usize, c: usize, hw: usize, groups: BnGroups) -> usize {
    reduce::group_slices(groups.count * c, n / groups.count * hw)
}

/// Checks that `groups` cuts [N, C, ...] (N = T*B) into whole groups, naming the layer.
fn check_groups(n: usize, groups: BnGroups, name: &str) {
    if groups.count > 1 {
        assert!(
            groups.batch.is_multiple_of(groups.count) && n.is_multiple_of(groups.batch),
            "{name}: {} BatchNorm groups of a batch of {} do not cut {n} samples",
            groups.count,
            groups.batch
        );
    }
}

/// The entry for `hw` values per row: vec4 loads where rows are whole vec4s.
fn entry(scalar: &'static str, vec4: &'static str, hw: usize) -> &'static str {
    if hw.is_multiple_of(4) {
        vec4
    } else {
        scalar
    }
}

/// y = (x - running_mean) / sqrt(running_var + eps) * weight + bias.
pub fn batchnorm_eval(g: &mut Graph, x: TensorId, bn: BnParams, name: &str) -> TensorId {
    let (n, c, hw) = dims(g, x, name);
    let shape = g.shape(x).to_vec();
    let y = g.intermediate(name, &shape);
    g.push(Node {
        shader: &SHADER,
        entry: "bn_eval",
        params: params(n, c, hw),
        reads: vec![x, bn.weight, bn.bias, bn.running_mean, bn.running_var],
        writes: vec![y],
        workgroups: grid_1d(n * c * hw, 256),
        label: name.to_string(),
        cost: pointwise_cost(n * c * hw, n * c * hw + 4 * c, 2),
    });
    y
}

/// The statistics pass of training-mode BN: batch mean and invstd over N*H*W per channel (saved
/// for backward and for whatever kernel applies them), running statistics updated in place
/// (momentum 0.1, unbiased variance). One workgroup per channel where that is wide enough (the
/// same bits as ever), else per-slice partials ([`slices`]) and a pass merging them. Scalar
/// loads, unlike the backward's: the spikes downstream flip on the statistics' last bits, and
/// vec4 sums round differently (the 32x32 train-step fixture's loss moves by 0.6%).
pub fn batchnorm_stats(g: &mut Graph, x: TensorId, bn: BnParams, name: &str) -> BnSaved {
    let (n, c, hw) = dims(g, x, name);
    let groups = bn.groups;
    check_groups(n, groups, name);
    // One statistic per (group, channel), at g * C + ch.
    let gc = groups.count * c;
    let mean = g.intermediate(&format!("{name}.mean"), &[gc]);
    let invstd = g.intermediate(&format!("{name}.invstd"), &[gc]);
    let winv = g.intermediate(&format!("{name}.weight_invstd"), &[gc]);
    let stats = g.arena(&format!("{name}.stats"), Role::Intermediate, &[mean, invstd, winv], &Layout::packed(&[gc; 3]));
    let p = group_slices(n, c, hw, groups);
    let numel = n * c * hw;
    let writes = vec![stats, bn.running_mean, bn.running_var];
    if p == 1 {
        g.push(Node {
            shader: &SHADER,
            entry: "bn_stats",
            params: sliced_params(n, c, hw, groups, 1),
            reads: vec![x, bn.weight],
            writes,
            workgroups: [size_u32(c), size_u32(groups.count), 1],
            label: format!("{name}.stats"),
            cost: Cost { flops: 3 * numel as u64, bytes: 4 * (2 * numel + 7 * c) as u64 },
        });
    } else {
        let parts = g.intermediate(&format!("{name}.stats.partials"), &[gc, p, 2]);
        g.push(Node {
            shader: &SHADER,
            entry: "bn_stats_partials",
            params: sliced_params(n, c, hw, groups, p),
            reads: vec![x],
            writes: vec![parts],
            workgroups: [size_u32(c), size_u32(groups.count * p), 1],
            label: format!("{name}.stats.partials"),
            cost: Cost { flops: 3 * numel as u64, bytes: 4 * (2 * numel + 2 * c * p) as u64 },
        });
        g.push(Node {
            shader: &SHADER,
            entry: "bn_stats_final",
            params: sliced_params(n, c, hw, groups, p),
            reads: vec![parts, bn.weight],
            writes,
            workgroups: grid_1d(gc, 256),
            label: format!("{name}.stats"),
            cost: Cost { flops: 10 * (c * p) as u64, bytes: 4 * (2 * c * p + 6 * c) as u64 },
        });
    }
    BnSaved { mean, invstd, stats }
}

/// Training-mode BN: batch statistics over N*H*W, running statistics updated in place
/// (momentum 0.1, unbiased variance). Returns y and the statistics backward needs.
pub fn batchnorm_train(g: &mut Graph, x: TensorId, bn: BnParams, name: &str) -> (TensorId, BnSaved) {
    train_apply(g, x, bn, None, name)
}

/// Training-mode BN followed by a residual add in one pass over memory: y = BN(x) + r, the sum
/// rounded as `bn_train_apply` then `elementwise::add` round it. Backward: BN's, and dr = dy.
pub fn batchnorm_train_add(g: &mut Graph, x: TensorId, bn: BnParams, r: TensorId, name: &str) -> TensorId {
    train_apply(g, x, bn, Some(r), name).0
}

/// The statistics pass, then y = BN(x) [+ r] in one kernel, recorded for backward.
fn train_apply(g: &mut Graph, x: TensorId, bn: BnParams, r: Option<TensorId>, name: &str) -> (TensorId, BnSaved) {
    let (n, c, hw) = dims(g, x, name);
    if let Some(r) = r {
        assert_eq!(g.shape(x), g.shape(r), "{name}: the residual must have the BatchNorm input's shape");
    }
    let saved = batchnorm_stats(g, x, bn, name);
    let shape = g.shape(x).to_vec();
    let y = g.intermediate(name, &shape);
    let mut reads = vec![x, bn.weight, bn.bias, saved.mean, saved.invstd];
    reads.extend(r);
    let numel = n * c * hw;
    let adds = r.is_some() as usize;
    g.push(Node {
        shader: &SHADER,
        entry: if r.is_some() { "bn_train_apply_add" } else { "bn_train_apply" },
        params: apply_params(n, c, hw, bn.groups),
        reads,
        writes: vec![y],
        workgroups: grid_1d(numel, 256),
        label: name.to_string(),
        cost: pointwise_cost(numel, numel * (1 + adds) + 4 * c, 2 + adds as u64),
    });
    let label = name.to_string();
    let mut inputs = vec![x, bn.weight, bn.bias];
    inputs.extend(r);
    g.record(name, inputs, vec![y], move |g, go, needs| {
        let Some(dy) = go[0] else { return vec![None; needs.len()] };
        let mut grads = batchnorm_train_backward(g, dy, x, bn, saved, [needs[0], needs[1], needs[2]], &label).to_vec();
        if r.is_some() {
            grads.push(needs[3].then_some(dy));
        }
        grads
    });
    (y, saved)
}

/// Training-mode BN followed by Swish, and by a residual add where `r` is given, in one pass
/// over memory: y = swish(BN(x)) [+ r], rounded as `bn_train_apply`, `elementwise::swish` and
/// `elementwise::add` round it. Backward recomputes BN's output from x (kept for BN's backward
/// anyway) instead of keeping it for Swish's: `bn_swish_backward`, then BN's backward; dr = dy.
pub fn batchnorm_train_swish(g: &mut Graph, x: TensorId, bn: BnParams, r: Option<TensorId>, name: &str) -> TensorId {
    let (n, c, hw) = dims(g, x, name);
    if let Some(r) = r {
        assert_eq!(g.shape(x), g.shape(r), "{name}: the residual must have the BatchNorm input's shape");
    }
    let saved = batchnorm_stats(g, x, bn, name);
    let shape = g.shape(x).to_vec();
    let y = g.intermediate(name, &shape);
    let mut reads = vec![x, bn.weight, bn.bias, saved.mean, saved.invstd];
    reads.extend(r);
    let numel = n * c * hw;
    g.push(Node {
        shader: &SHADER,
        entry: if r.is_some() { "bn_train_apply_swish_add" } else { "bn_train_apply_swish" },
        params: apply_params(n, c, hw, bn.groups),
        reads,
        writes: vec![y],
        workgroups: grid_1d(numel, 256),
        label: name.to_string(),
        cost: pointwise_cost(numel, numel * (1 + r.is_some() as usize) + 4 * c, 7),
    });
    let label = name.to_string();
    let mut inputs = vec![x, bn.weight, bn.bias];
    inputs.extend(r);
    g.record(name, inputs, vec![y], move |g, go, needs| {
        let Some(dy) = go[0] else { return vec![None; needs.len()] };
        let dv = g.intermediate(&format!("{label}.swish_grad"), &shape);
        g.push(Node {
            shader: &SHADER,
            entry: "bn_swish_backward",
            params: apply_params(n, c, hw, bn.groups),
            reads: vec![dy, x, saved.mean, saved.invstd, bn.weight, bn.bias],
            writes: vec![dv],
            workgroups: grid_1d(numel, 256),
            label: format!("{label}.backward"),
            cost: pointwise_cost(numel, 2 * numel + 4 * c, 12),
        });
        let mut grads = batchnorm_train_backward(g, dv, x, bn, saved, [needs[0], needs[1], needs[2]], &label).to_vec();
        if r.is_some() {
            grads.push(needs[3].then_some(dy));
        }
        grads
    });
    y
}

/// The backward of training-mode BN (any op whose output is BN(x) plus terms that do not depend on
/// x, weight or bias): from dy, the gradients of (x, weight, bias) where `needs` asks for them.
/// Reads x and the saved statistics, never y, so an op that fuses the apply into its consumer
/// keeps only what BN alone keeps. Two passes over (dy, x) in (channel x slice) workgroups: the
/// slice sums of dy and dy * xhat, then dx, which adds the slice sums up itself, writes the
/// parameter gradients, and leaves dx's channel sums for `reduce::group_sum` (a conv bias).
pub fn batchnorm_train_backward(
    g: &mut Graph,
    dy: TensorId,
    x: TensorId,
    bn: BnParams,
    saved: BnSaved,
    needs: [bool; 3],
    label: &str,
) -> [Option<TensorId>; 3] {
    let (n, c, hw) = dims(g, x, label);
    assert_eq!(g.shape(bn.weight), [c], "{label}: BatchNorm weight for {c} channels");
    let groups = bn.groups;
    check_groups(n, groups, label);
    let gc = groups.count * c;
    let p = group_slices(n, c, hw, groups);
    let params = sliced_params(n, c, hw, groups, p);
    let numel = n * c * hw;
    let grid = [size_u32(c), size_u32(groups.count * p), 1];
    let parts = g.intermediate(&format!("{label}.grad_stats.partials"), &[gc, p, 2]);
    g.push(Node {
        shader: &SHADER,
        entry: entry("bn_backward_reduce", "bn_backward_reduce_vec4", hw),
        params: params.clone(),
        reads: vec![dy, x, saved.stats],
        writes: vec![parts],
        workgroups: grid,
        label: format!("{label}.grad_stats"),
        cost: Cost { flops: 4 * numel as u64, bytes: 8 * numel as u64 + 8 * (c * p) as u64 },
    });
    let dweight = g.intermediate(&format!("{label}.grad_weight"), &[c]);
    let dbias = g.intermediate(&format!("{label}.grad_bias"), &[c]);
    let dx = if needs[0] {
        let shape = g.shape(x).to_vec();
        let dx = g.intermediate(&format!("{label}.grad_input"), &shape);
        let dx_parts = g.intermediate(&format!("{label}.grad_input.channel_sums"), &[gc, p]);
        g.push(Node {
            shader: &SHADER,
            entry: entry("bn_backward_input", "bn_backward_input_vec4", hw),
            params,
            reads: vec![dy, x, saved.stats, parts],
            writes: vec![dx, dx_parts, dweight, dbias],
            workgroups: grid,
            label: format!("{label}.grad_input"),
            cost: pointwise_cost(numel, 2 * numel + 2 * gc * p, 9),
        });
        // Group g's sums are row g: blocks of images, which serve the sum over the whole batch.
        let rows = groups.count;
        g.partial_sums.insert(dx, PartialSums { part: dx_parts, rows, slices: p, per_image: false });
        Some(dx)
    } else {
        g.push(Node {
            shader: &SHADER,
            entry: "bn_backward_final",
            params,
            reads: vec![parts],
            writes: vec![dweight, dbias],
            workgroups: grid_1d(c, 256),
            label: format!("{label}.grad_stats.final"),
            cost: Cost { flops: 2 * (gc * p) as u64, bytes: 8 * (gc * p) as u64 + 8 * c as u64 },
        });
        None
    };
    [dx, needs[1].then_some(dweight), needs[2].then_some(dbias)]
}

/// CPU reference of the training-mode BN backward: (dx, dweight, dbias), f64 sums.
pub fn batchnorm_train_backward_cpu(
    dy: &[f32],
    x: &[f32],
    c: usize,
    hw: usize,
    w: &[f32],
    mean: &[f32],
    invstd: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = x.len() / (c * hw);
    let m = (n * hw) as f32;
    let mut dw = vec![0f64; c];
    let mut db = vec![0f64; c];
    for (i, (&g, &xv)) in dy.iter().zip(x).enumerate() {
        let ch = (i / hw) % c;
        db[ch] += g as f64;
        dw[ch] += (g * (xv - mean[ch]) * invstd[ch]) as f64;
    }
    let (dw, db): (Vec<f32>, Vec<f32>) =
        (dw.iter().map(|&v| v as f32).collect(), db.iter().map(|&v| v as f32).collect());
    let dx = dy
        .iter()
        .zip(x)
        .enumerate()
        .map(|(i, (&g, &xv))| {
            let ch = (i / hw) % c;
            let xhat = (xv - mean[ch]) * invstd[ch];
            w[ch] * invstd[ch] / m * (m * g - db[ch] - xhat * dw[ch])
        })
        .collect();
    (dx, dw, db)
}

/// CPU reference of [`batchnorm_eval`] (PyTorch's affine form).
pub fn batchnorm_eval_cpu(x: &[f32], c: usize, hw: usize, w: &[f32], b: &[f32], rm: &[f32], rv: &[f32]) -> Vec<f32> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let ch = (i / hw) % c;
            let alpha = w[ch] / (rv[ch] + EPS).sqrt();
            let beta = b[ch] - rm[ch] * alpha;
            v * alpha + beta
        })
        .collect()
}

/// CPU reference of [`batchnorm_train`]: statistics accumulated in f64 (as PyTorch's CPU kernel),
/// running statistics updated in place. Returns (y, mean, invstd).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_cpu(
    x: &[f32],
    c: usize,
    hw: usize,
    w: &[f32],
    b: &[f32],
    rm: &mut [f32],
    rv: &mut [f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = x.len() / (c * hw);
    let m = (n * hw) as f64;
    let mut mean = vec![0f32; c];
    let mut invstd = vec![0f32; c];
    for ch in 0..c {
        let vals = (0..n).flat_map(|s| x[(s * c + ch) * hw..(s * c + ch + 1) * hw].iter());
        let mu = vals.clone().map(|&v| v as f64).sum::<f64>() / m;
        let var_sum: f64 = vals.map(|&v| (v as f64 - mu).powi(2)).sum();
        mean[ch] = mu as f32;
        invstd[ch] = (1.0 / (var_sum / m + EPS as f64).sqrt()) as f32;
        let unbiased = var_sum / (m - 1.0).max(1.0);
        rm[ch] = (1.0 - MOMENTUM) * rm[ch] + MOMENTUM * mu as f32;
        rv[ch] = (1.0 - MOMENTUM) * rv[ch] + MOMENTUM * unbiased as f32;
    }
    let y = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let ch = (i / hw) % c;
            let alpha = w[ch] * invstd[ch];
            let beta = b[ch] - mean[ch] * alpha;
            v * alpha + beta
        })
        .collect();
    (y, mean, invstd)
}

/// CPU reference of [`batchnorm_train_add`]: [`batchnorm_train_cpu`]'s y plus r, in that order.
/// Returns (y, mean, invstd).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_add_cpu(
    x: &[f32],
    c: usize,
    hw: usize,
    w: &[f32],
    b: &[f32],
    rm: &mut [f32],
    rv: &mut [f32],
    r: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (y, mean, invstd) = batchnorm_train_cpu(x, c, hw, w, b, rm, rv);
    (y.iter().zip(r).map(|(a, b)| a + b).collect(), mean, invstd)
}

/// CPU reference of [`batchnorm_train_swish`]: [`batchnorm_train_cpu`]'s y, Swish, then r if
/// given. Returns (y, mean, invstd).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_swish_cpu(
    x: &[f32],
    c: usize,
    hw: usize,
    w: &[f32],
    b: &[f32],
    rm: &mut [f32],
    rv: &mut [f32],
    r: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (y, mean, invstd) = batchnorm_train_cpu(x, c, hw, w, b, rm, rv);
    let mut y = crate::ops::elementwise::swish_cpu(&y);
    if let Some(r) = r {
        y = y.iter().zip(r).map(|(a, b)| a + b).collect();
    }
    (y, mean, invstd)
}

/// The samples of N = `n` that form BatchNorm group `g` of `groups`, in the kernels' order.
pub fn group_samples(n: usize, groups: BnGroups, g: usize) -> Vec<usize> {
    (0..n).filter(|&s| groups.of_sample(s) == g).collect()
}

/// x's values of `samples` (rows of C * HW), as one tensor.
fn gather(x: &[f32], samples: &[usize], row: usize) -> Vec<f32> {
    samples.iter().flat_map(|&s| x[s * row..(s + 1) * row].iter().copied()).collect()
}

/// Writes `part` (rows of `samples`, as [`gather`] took them) back into `out`.
fn scatter(out: &mut [f32], part: &[f32], samples: &[usize], row: usize) {
    for (k, &s) in samples.iter().enumerate() {
        out[s * row..(s + 1) * row].copy_from_slice(&part[k * row..(k + 1) * row]);
    }
}

/// CPU reference of training-mode BN over `groups`: every group through
/// [`batchnorm_train_cpu`] on its own samples, the running statistics from group 0 alone.
/// Returns (y, mean, invstd), the statistics [G * C] at g * C + ch.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_groups_cpu(
    x: &[f32],
    c: usize,
    hw: usize,
    groups: BnGroups,
    w: &[f32],
    b: &[f32],
    rm: &mut [f32],
    rv: &mut [f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (row, n) = (c * hw, x.len() / (c * hw));
    let mut y = vec![0f32; x.len()];
    let (mut mean, mut invstd) = (Vec::new(), Vec::new());
    for g in 0..groups.count {
        let samples = group_samples(n, groups, g);
        let (mut rm_g, mut rv_g) = (rm.to_vec(), rv.to_vec());
        let (yg, m, s) = batchnorm_train_cpu(&gather(x, &samples, row), c, hw, w, b, &mut rm_g, &mut rv_g);
        if g == 0 {
            rm.copy_from_slice(&rm_g);
            rv.copy_from_slice(&rv_g);
        }
        scatter(&mut y, &yg, &samples, row);
        mean.extend(m);
        invstd.extend(s);
    }
    (y, mean, invstd)
}

/// CPU reference of the backward of [`batchnorm_train_groups_cpu`]: every group's
/// [`batchnorm_train_backward_cpu`] with its statistics; the parameter gradients are the groups'
/// sums. Returns (dx, dweight, dbias).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_backward_groups_cpu(
    dy: &[f32],
    x: &[f32],
    c: usize,
    hw: usize,
    groups: BnGroups,
    w: &[f32],
    mean: &[f32],
    invstd: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (row, n) = (c * hw, x.len() / (c * hw));
    let mut dx = vec![0f32; x.len()];
    let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
    for g in 0..groups.count {
        let samples = group_samples(n, groups, g);
        let st = g * c..(g + 1) * c;
        let (dxg, dwg, dbg) = batchnorm_train_backward_cpu(
            &gather(dy, &samples, row),
            &gather(x, &samples, row),
            c,
            hw,
            w,
            &mean[st.clone()],
            &invstd[st],
        );
        scatter(&mut dx, &dxg, &samples, row);
        for ch in 0..c {
            dw[ch] += dwg[ch];
            db[ch] += dbg[ch];
        }
    }
    (dx, dw, db)
}
