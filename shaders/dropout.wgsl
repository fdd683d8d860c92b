// dropout.wgsl: training-mode dropout with counter-based masks, so a training step is a pure
// function of (seed, step) and resumes bit-identically.
//
//   keep[i] = philox((i, layer, step, STREAM_DROPOUT = 3), (seed_lo, seed_hi)).x >= threshold,
//   threshold = round(p * 2^32);   y = keep ? x * scale : 0,   scale = 1 / (1 - p)
//   dropout_backward: dx = keep ? dy * scale : 0   (the same mask, recomputed)
//
// (seed_lo, seed_hi, step) are read from the 4-word `key` tensor the trainer writes each step;
// `layer` tells the dropout layers of one net apart. Philox comes from common/philox.wgsl.

struct Params {
    numel: u32, layer: u32, threshold: u32, _pad: u32,
    scale: f32, _pad1: u32, _pad2: u32, _pad3: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> key: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const STREAM_DROPOUT: u32 = 3u;

fn kept(i: u32) -> bool {
    let r = philox(vec4<u32>(i, p.layer, key[2], STREAM_DROPOUT), vec2<u32>(key[0], key[1]));
    return r.x >= p.threshold;
}

// Forward (x = activations) and backward (x = upstream gradient): the same masked scaling.
@compute @workgroup_size(256)
fn dropout(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    y[i] = select(0.0, x[i] * p.scale, kept(i));
}
