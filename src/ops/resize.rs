//! Bilinear resize (torch's align_corners=False, no antialias) fused with an affine map and
//! channel repetition: the FID network's input preprocessing. Inference only.

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{grid_1d, size_u32, Cost, Graph, Node, Params, TensorId};
use crate::shader;

pub static SHADER: Shader = shader!("resize", uses "index");

/// Uniform parameters of `resize_bilinear` (WGSL `Params`): `numel` outputs, [cin, h, w] in,
/// [cout, ho, wo] out, the source scales in / out and the affine map `mul`, `add`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct ResizeParams {
    pub numel: u32,
    pub cin: u32,
    pub h: u32,
    pub w: u32,
    pub cout: u32,
    pub ho: u32,
    pub wo: u32,
    pub scale_h: f32,
    pub scale_w: f32,
    pub mul: f32,
    pub add: f32,
    pub _p0: u32,
}

/// y = mul * bilinear_resize(x, [ho, wo]) + add, [N, Cin, H, W] -> [N, cout, ho, wo], output
/// channel c reading input channel c % Cin.
#[allow(clippy::too_many_arguments)]
pub fn resize_bilinear(
    g: &mut Graph,
    x: TensorId,
    [ho, wo]: [usize; 2],
    cout: usize,
    mul: f32,
    add: f32,
    name: &str,
) -> TensorId {
    let s = g.shape(x).to_vec();
    assert!(s.len() == 4 && ho > 0 && wo > 0 && cout > 0, "{name}: cannot resize {s:?} to {cout}x{ho}x{wo}");
    let y = g.intermediate(name, &[s[0], cout, ho, wo]);
    let numel = g.info(y).numel();
    let params = ResizeParams {
        numel: size_u32(numel),
        cin: size_u32(s[1]),
        h: size_u32(s[2]),
        w: size_u32(s[3]),
        cout: size_u32(cout),
        ho: size_u32(ho),
        wo: size_u32(wo),
        scale_h: scale(s[2], ho),
        scale_w: scale(s[3], wo),
        mul,
        add,
        _p0: 0,
    };
    g.push(Node {
        shader: &SHADER,
        entry: "resize_bilinear",
        params: Params::of(&params),
        reads: vec![x],
        writes: vec![y],
        workgroups: grid_1d(numel, 256),
        label: name.to_string(),
        cost: Cost { flops: 10 * numel as u64, bytes: 4 * (g.info(x).numel() + numel) as u64 },
    });
    y
}

/// torch's area_pixel_compute_scale without align_corners: in / out, in f32.
fn scale(input: usize, output: usize) -> f32 {
    input as f32 / output as f32
}

/// (lower index, upper index, weight of the upper) along one axis, as torch computes them.
fn source(o: usize, scale: f32, size: usize) -> (usize, usize, f32) {
    let s = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
    let i0 = (s as usize).min(size - 1);
    let i1 = (i0 + 1).min(size - 1);
    (i0, i1, (s - i0 as f32).clamp(0.0, 1.0))
}

/// CPU reference of [`resize_bilinear`] (same operation order).
pub fn resize_bilinear_cpu(
    x: &[f32],
    [n, cin, h, w]: [usize; 4],
    [ho, wo]: [usize; 2],
    cout: usize,
    mul: f32,
    add: f32,
) -> Vec<f32> {
    let (sh, sw) = (scale(h, ho), scale(w, wo));
    let mut y = Vec::with_capacity(n * cout * ho * wo);
    for b in 0..n {
        for c in 0..cout {
            let plane = &x[(b * cin + c % cin) * h * w..][..h * w];
            for oy in 0..ho {
                let (y0, y1, ly) = source(oy, sh, h);
                for ox in 0..wo {
                    let (x0, x1, lx) = source(ox, sw, w);
                    let top = plane[y0 * w + x0] * (1.0 - lx) + plane[y0 * w + x1] * lx;
                    let bottom = plane[y1 * w + x0] * (1.0 - lx) + plane[y1 * w + x1] * lx;
                    y.push((top * (1.0 - ly) + bottom * ly) * mul + add);
                }
            }
        }
    }
    y
}
