//! The convolution weight gradient with subgroup reductions: a variant of [`super::conv`]'s
//! weight gradient for devices with `Features::SUBGROUP`, in a module of its own because a
//! shader module that uses subgroups fails to compile on a device without them. The node, its
//! parameters, the partial sums it writes and their reduction are conv's; the CPU reference is
//! [`super::conv::conv2d_grad_weight_cpu`] (same chunks, another order within a chunk).

use crate::gpu::Shader;
use crate::graph::{Needs, TileWork, Variant};
use crate::ops::conv::GRAD_W_CHUNK;
use crate::shader;

pub static SHADER: Shader = shader!(trusted "conv_subgroup");

/// The weight-gradient (partial sums) variant "sg4xkk": 4 output channels x all taps of one
/// input channel per workgroup, positions split over its 64 invocations and summed with
/// subgroupAdd (see shaders/conv_subgroup.wgsl). Offered where the device has subgroups.
pub fn grad_weight_variant(cout: usize, cin: usize, k: usize, parts: usize) -> Variant {
    let workgroups = [cin as u32, cout.div_ceil(4) as u32, parts as u32];
    Variant {
        name: "sg4xkk".into(),
        entry: "conv2d_grad_weight_subgroup",
        constants: vec![("GRAD_W_CHUNK", GRAD_W_CHUNK as f64)],
        workgroups,
        // The subgroups' slots are written before the barrier and only those are read after it.
        writes_workgroup_memory_first: true,
        shader: Some(&SHADER),
        needs: Needs {
            features: wgpu::Features::SUBGROUP,
            workgroup_bytes: 576 * 16,
            invocations: 64,
            ..Needs::default()
        },
        // 4 output channels x K*K taps per workgroup (channels past Cout are clamped, recomputed).
        tile: Some(TileWork::of_grid(parts * cout * cin * k * k, workgroups, 4 * k * k)),
    }
}
