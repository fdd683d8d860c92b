//! 2-D max and average pooling (Inception-v3's stem, branch pools and final pool). Inference
//! only: no backward rule is recorded.

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{grid_1d, size_u32, Cost, Graph, Node, Params, TensorId};
use crate::ops::conv::conv_out;
use crate::shader;

pub static SHADER: Shader = shader!("pool", uses "index");

/// Uniform parameters of both pools (WGSL `Params`): `numel` outputs, input and output planes,
/// the kh x kw window, stride and padding.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct PoolParams {
    pub numel: u32,
    pub h: u32,
    pub w: u32,
    pub ho: u32,
    pub wo: u32,
    pub kh: u32,
    pub kw: u32,
    pub stride: u32,
    pub pad: u32,
    pub _p0: u32,
    pub _p1: u32,
    pub _p2: u32,
}

/// Which reduction a pool applies over its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    Max,
    /// Mean over the window's positions inside the image (torch's count_include_pad=False).
    Avg,
}

/// Pool [N, C, H, W] with a k x k window, stride `stride`, padding `pad`.
pub fn pool2d(g: &mut Graph, x: TensorId, kind: Pool, k: usize, stride: usize, pad: usize, name: &str) -> TensorId {
    let s = g.shape(x).to_vec();
    assert!(s.len() == 4 && s[2] + 2 * pad >= k && s[3] + 2 * pad >= k, "{name}: cannot pool {s:?} with k{k} p{pad}");
    assert!(pad < k, "{name}: padding {pad} must be smaller than the window {k}");
    let (ho, wo) = (conv_out(s[2], k, stride, pad), conv_out(s[3], k, stride, pad));
    let y = g.intermediate(name, &[s[0], s[1], ho, wo]);
    let numel = g.info(y).numel();
    let entry = match kind {
        Pool::Max => "max_pool2d",
        Pool::Avg => "avg_pool2d",
    };
    let params = PoolParams {
        numel: size_u32(numel),
        h: size_u32(s[2]),
        w: size_u32(s[3]),
        ho: size_u32(ho),
        wo: size_u32(wo),
        kh: size_u32(k),
        kw: size_u32(k),
        stride: size_u32(stride),
        pad: size_u32(pad),
        _p0: 0,
        _p1: 0,
        _p2: 0,
    };
    g.push(Node {
        shader: &SHADER,
        entry,
        params: Params::of(&params),
        reads: vec![x],
        writes: vec![y],
        workgroups: grid_1d(numel, 256),
        label: name.to_string(),
        cost: Cost { flops: (numel * k * k) as u64, bytes: 4 * (g.info(x).numel() + numel) as u64 },
    });
    y
}

/// CPU reference of [`pool2d`] (same window order: ky, then kx).
pub fn pool2d_cpu(x: &[f32], [n, c, h, w]: [usize; 4], kind: Pool, k: usize, stride: usize, pad: usize) -> Vec<f32> {
    let (ho, wo) = (conv_out(h, k, stride, pad), conv_out(w, k, stride, pad));
    let mut y = Vec::with_capacity(n * c * ho * wo);
    for plane in x.chunks_exact(h * w).take(n * c) {
        for oy in 0..ho {
            for ox in 0..wo {
                let (mut m, mut sum, mut count) = (f32::MIN, 0f32, 0u32);
                for ky in 0..k {
                    let iy = (oy * stride + ky) as isize - pad as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..k {
                        let ix = (ox * stride + kx) as isize - pad as isize;
                        if ix < 0 || ix >= w as isize {
                            continue;
                        }
                        let v = plane[iy as usize * w + ix as usize];
                        m = m.max(v);
                        sum += v;
                        count += 1;
                    }
                }
                y.push(match kind {
                    Pool::Max => m,
                    Pool::Avg => sum / count as f32,
                });
            }
        }
    }
    y
}
