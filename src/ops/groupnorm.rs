//! GroupNorm over [B, C, H, W] (statistics per image and group of C/G channels, no running
//! statistics: training and inference are the same op), with an optional Swish fused into the
//! apply, since pytorch-ddpm follows every GroupNorm but the attention block's with one.

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{grid_1d, size_u32, Cost, Graph, Node, Params, TensorId};
use crate::ops::pointwise_cost;
use crate::shader;

pub static SHADER: Shader = shader!(trusted "groupnorm", uses "index", "tree_sum");

/// Uniform parameters of every GroupNorm entry (WGSL `Params`): [b, c, s] in `groups` groups,
/// eps, and whether the apply (and its backward) includes the Swish.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct GroupNormParams {
    pub b: u32,
    pub c: u32,
    pub s: u32,
    pub groups: u32,
    pub eps: f32,
    pub swish: u32,
    pub _pad1: u32,
    pub _pad2: u32,
}

/// nn.GroupNorm's default.
pub const EPS: f32 = 1e-5;

/// Shape of a GroupNorm problem: batch, channels, spatial size, groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GnShape {
    pub b: usize,
    pub c: usize,
    pub s: usize,
    pub groups: usize,
}

impl GnShape {
    fn numel(&self) -> usize {
        self.b * self.c * self.s
    }
    /// Values per (image, group).
    fn group_len(&self) -> usize {
        self.c / self.groups * self.s
    }
    fn params(&self, swish: bool) -> Vec<u32> {
        let [b, c, s, groups] = [self.b, self.c, self.s, self.groups].map(size_u32);
        Params::of(&GroupNormParams { b, c, s, groups, eps: EPS, swish: swish as u32, _pad1: 0, _pad2: 0 })
    }
}

/// y = GroupNorm(x) * weight + bias, followed by Swish when `swish`. x: [B, C, ...], C a multiple
/// of `groups`; weight and bias [C].
pub fn groupnorm(
    g: &mut Graph,
    x: TensorId,
    weight: TensorId,
    bias: TensorId,
    groups: usize,
    swish: bool,
    name: &str,
) -> TensorId {
    let xs = g.shape(x).to_vec();
    assert!(xs.len() >= 2, "{name}: GroupNorm input must be [B, C, ...], got {xs:?}");
    let sh = GnShape { b: xs[0], c: xs[1], s: xs[2..].iter().product(), groups };
    assert!(groups > 0 && sh.c.is_multiple_of(groups), "{name}: {} channels do not split into {groups} groups", sh.c);
    assert!(g.shape(weight) == [sh.c] && g.shape(bias) == [sh.c], "{name}: weight and bias must be [{}]", sh.c);
    let bg = sh.b * groups;
    let mean = g.intermediate(&format!("{name}.mean"), &[bg]);
    let invstd = g.intermediate(&format!("{name}.invstd"), &[bg]);
    g.push(Node {
        shader: &SHADER,
        entry: "gn_stats",
        params: sh.params(swish),
        reads: vec![x],
        writes: vec![mean, invstd],
        workgroups: [bg as u32, 1, 1],
        label: format!("{name}.stats"),
        cost: Cost { flops: 3 * sh.numel() as u64, bytes: 4 * (2 * sh.numel() + 2 * bg) as u64 },
    });
    let y = g.intermediate(name, &xs);
    g.push(Node {
        shader: &SHADER,
        entry: "gn_apply",
        params: sh.params(swish),
        reads: vec![x, weight, bias, mean, invstd],
        writes: vec![y],
        workgroups: grid_1d(sh.numel(), 256),
        label: name.to_string(),
        cost: pointwise_cost(sh.numel(), sh.numel() + 2 * sh.c + 2 * bg, if swish { 7 } else { 3 }),
    });
    let label = name.to_string();
    g.record(name, vec![x, weight, bias], vec![y], move |g, go, needs| {
        let Some(dy) = go[0] else { return vec![None; 3] };
        let reads = vec![dy, x, weight, bias, mean, invstd];
        let grad_cost = Cost { flops: 10 * sh.numel() as u64, bytes: 8 * sh.numel() as u64 };
        let dparams = (needs[1] || needs[2]).then(|| {
            let dweight = g.intermediate(&format!("{label}.grad_weight"), &[sh.c]);
            let dbias = g.intermediate(&format!("{label}.grad_bias"), &[sh.c]);
            g.push(Node {
                shader: &SHADER,
                entry: "gn_backward_param",
                params: sh.params(swish),
                reads: reads.clone(),
                writes: vec![dweight, dbias],
                workgroups: [sh.c as u32, 1, 1],
                label: format!("{label}.grad_params"),
                cost: grad_cost,
            });
            (dweight, dbias)
        });
        let dx = needs[0].then(|| {
            let sums = g.intermediate(&format!("{label}.grad_sums"), &[bg, 2]);
            g.push(Node {
                shader: &SHADER,
                entry: "gn_backward_group",
                params: sh.params(swish),
                reads: reads.clone(),
                writes: vec![sums],
                workgroups: [bg as u32, 1, 1],
                label: format!("{label}.grad_stats"),
                cost: grad_cost,
            });
            let dx = g.intermediate(&format!("{label}.grad_input"), &xs);
            let mut r = reads.clone();
            r.push(sums);
            g.push(Node {
                shader: &SHADER,
                entry: "gn_backward_input",
                params: sh.params(swish),
                reads: r,
                writes: vec![dx],
                workgroups: grid_1d(sh.numel(), 256),
                label: format!("{label}.grad_input"),
                cost: pointwise_cost(sh.numel(), 2 * sh.numel(), 14),
            });
            dx
        });
        vec![dx, dparams.filter(|_| needs[1]).map(|p| p.0), dparams.filter(|_| needs[2]).map(|p| p.1)]
    });
    y
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// CPU reference of [`groupnorm`]: statistics in f64 (as PyTorch's CPU kernel). Returns
/// (y, mean [B*G], invstd [B*G]).
pub fn groupnorm_cpu(
    x: &[f32],
    sh: GnShape,
    weight: &[f32],
    bias: &[f32],
    swish: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let m = sh.group_len();
    let (mut mean, mut invstd) = (Vec::new(), Vec::new());
    for grp in x.chunks(m) {
        let mu = grp.iter().map(|&v| v as f64).sum::<f64>() / m as f64;
        let var = grp.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / m as f64;
        mean.push(mu as f32);
        invstd.push((1.0 / (var + EPS as f64).sqrt()) as f32);
    }
    let y = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let (ch, bg) = ((i / sh.s) % sh.c, i / m);
            let z = (v - mean[bg]) * invstd[bg] * weight[ch] + bias[ch];
            if swish {
                z * sigmoid(z)
            } else {
                z
            }
        })
        .collect();
    (y, mean, invstd)
}

/// CPU reference of the backward of [`groupnorm`]: (dx, dweight, dbias), f64 sums.
pub fn groupnorm_backward_cpu(
    dy: &[f32],
    x: &[f32],
    sh: GnShape,
    weight: &[f32],
    bias: &[f32],
    swish: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (_, mean, invstd) = groupnorm_cpu(x, sh, weight, bias, swish);
    let m = sh.group_len();
    let parts: Vec<(f32, f32, usize, usize)> = x
        .iter()
        .zip(dy)
        .enumerate()
        .map(|(i, (&v, &g))| {
            let (ch, bg) = ((i / sh.s) % sh.c, i / m);
            let xhat = (v - mean[bg]) * invstd[bg];
            let z = xhat * weight[ch] + bias[ch];
            let dz = if swish {
                let sg = sigmoid(z);
                g * (sg + z * sg * (1.0 - sg))
            } else {
                g
            };
            (dz, xhat, ch, bg)
        })
        .collect();
    let (mut dw, mut db) = (vec![0f64; sh.c], vec![0f64; sh.c]);
    let (mut s1, mut s2) = (vec![0f64; sh.b * sh.groups], vec![0f64; sh.b * sh.groups]);
    for &(dz, xhat, ch, bg) in &parts {
        dw[ch] += (dz * xhat) as f64;
        db[ch] += dz as f64;
        s1[bg] += (dz * weight[ch]) as f64;
        s2[bg] += (dz * weight[ch] * xhat) as f64;
    }
    let dx = parts
        .iter()
        .map(|&(dz, xhat, ch, bg)| {
            invstd[bg] * (dz * weight[ch] - s1[bg] as f32 / m as f32 - xhat * s2[bg] as f32 / m as f32)
        })
        .collect();
    (dx, dw.into_iter().map(|v| v as f32).collect(), db.into_iter().map(|v| v as f32).collect())
}
