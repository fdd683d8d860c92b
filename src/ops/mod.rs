//! Op families. Each file owns one WGSL shader of the same name: it adds the op's dispatches to a
//! [`Graph`](crate::graph::Graph) (shape rule, bindings, grid, cost) and holds a plain CPU
//! reference of the same math, which the tests compare against. Ops know nothing of models.
//!
//! Design: docs/kernels.md (variants, bounds checks, cooperative matrices); docs/numerics.md
//! (parity, determinism, what the tests check).

pub mod attention;
pub mod batchnorm;
pub mod calibrate;
pub mod conv;
pub mod conv_subgroup;
pub mod coop_matmul;
pub mod dropout;
pub mod elementwise;
pub mod embedding;
pub mod groupnorm;
pub mod layout;
pub mod matmul;
pub mod neuron;
pub mod optim;
pub mod pool;
pub mod readout;
pub mod reduce;
pub mod resize;
pub mod sampler;
pub mod spike_attention;

use crate::graph::Cost;

/// Cost of a pointwise kernel: `flops_per` per output, each input and output touched once.
pub(crate) fn pointwise_cost(outputs: usize, inputs: usize, flops_per: u64) -> Cost {
    Cost { flops: outputs as u64 * flops_per, bytes: 4 * (outputs + inputs) as u64 }
}

/// Every shader the crate embeds, for validation and listings.
pub fn all_shaders() -> [&'static crate::gpu::Shader; 23] {
    [
        &attention::SHADER,
        &batchnorm::SHADER,
        &calibrate::SHADER,
        &conv::SHADER,
        &conv_subgroup::SHADER,
        &coop_matmul::SHADERS[0],
        &coop_matmul::SHADERS[1],
        &coop_matmul::SHADERS[2],
        &coop_matmul::SHADERS[3],
        &dropout::SHADER,
        &elementwise::SHADER,
        &embedding::SHADER,
        &groupnorm::SHADER,
        &layout::SHADER,
        &matmul::SHADER,
        &neuron::SHADER,
        &optim::SHADER,
        &pool::SHADER,
        &readout::SHADER,
        &reduce::SHADER,
        &resize::SHADER,
        &sampler::SHADER,
        &spike_attention::SHADER,
    ]
}
