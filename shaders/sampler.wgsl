// sampler.wgsl: the diffusion sampling loop on the GPU, without host round trips.
//
// One sampling step is: begin_step, the U-Net, update, advance. The host replays that node list
// S times; which step is running lives in a GPU counter `step[0]`, and every per-step constant in
// the table `coef` [S, 8]: (t as u32 bits, mode, a, b, c1, c2, c3, sigma), computed in f64 on the
// host and rounded to f32 as the reference does.
//
//   begin_step: at step 0, x = N(0, 1) noise (stream INIT); always t[b] = coef[step].t.
//   update, per element, with eps = the U-Net output:
//     mode 0 (DDPM ancestral):  x0 = clamp(a x - b eps, -1, 1);  x = c1 x0 + c2 x + sigma z
//     mode 1 (final, t = 0):    x  = clamp((x - b eps) / a, -1, 1)
//     mode 2 (DDIM, eta = 0):   x0 = clamp((x - b eps) / a, -1, 1);  x = c1 x0 + c3 eps
//   advance: step[0] += 1 (its own one-invocation dispatch, so no kernel races on the counter).
//
// Noise z is Gaussian from Philox4x32-10 (counter = (element, image, step, stream), key = seed)
// and Box-Muller, so an image's noise depends only on (seed, its global index, step, element),
// never on the batch it was sampled in. `z_source` 1 reads z from a buffer instead (tests).
//
// Training (q_sample): x_t = sqrt(abar[t_b]) x0 + sqrt(1 - abar[t_b]) noise, with the two
// coefficients per image precomputed on the host in f64 and rounded to f32 (the reference's
// `extract`), noise from Philox (stream NOISE, step = the training step) or from a buffer.

struct Params {
    numel: u32, per_image: u32, batch: u32, image_base: u32,
    seed_lo: u32, seed_hi: u32, z_source: u32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// ---- Box-Muller over Philox4x32-10 (mulhilo, philox: common/philox.wgsl) ----------------------

const STREAM_STEP: u32 = 0u;
const STREAM_INIT: u32 = 1u;
const STREAM_TRAIN: u32 = 2u;

fn gaussian(element: u32, image: u32, step: u32, stream: u32) -> f32 {
    let r = philox(vec4<u32>(element, image, step, stream), vec2<u32>(p.seed_lo, p.seed_hi));
    let u1 = (f32(r.x >> 8u) + 1.0) * (1.0 / 16777216.0);   // (0, 1]
    let u2 = f32(r.y >> 8u) * (1.0 / 16777216.0);           // [0, 1)
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

// ---- bindings --------------------------------------------------------------------------------

@group(0) @binding(1) var<storage, read> coef: array<f32>;
@group(0) @binding(2) var<storage, read> step: array<u32>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> t_out: array<u32>;

@group(0) @binding(3) var<storage, read> eps: array<f32>;
@group(0) @binding(4) var<storage, read> z_in: array<f32>;
@group(0) @binding(5) var<storage, read_write> x_upd: array<f32>;

@group(0) @binding(1) var<storage, read_write> step_rw: array<u32>;

@group(0) @binding(1) var<storage, read_write> noise_out: array<f32>;

@compute @workgroup_size(256)
fn begin_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    let k = step[0];
    if (i < p.batch) {
        t_out[i] = bitcast<u32>(coef[k * 8u]);
    }
    if (k == 0u && i < p.numel) {
        let image = p.image_base + i / p.per_image;
        x[i] = gaussian(i % p.per_image, image, 0u, STREAM_INIT);
    }
}

@compute @workgroup_size(256)
fn update(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    let k = step[0];
    let row = k * 8u;
    let mode = bitcast<u32>(coef[row + 1u]);
    let a = coef[row + 2u];
    let b = coef[row + 3u];
    let xv = x_upd[i];
    let e = eps[i];
    if (mode == 1u) {
        x_upd[i] = clamp((xv - b * e) / a, -1.0, 1.0);
    } else if (mode == 2u) {
        let x0 = clamp((xv - b * e) / a, -1.0, 1.0);
        x_upd[i] = coef[row + 4u] * x0 + coef[row + 6u] * e;
    } else {
        let x0 = clamp(a * xv - b * e, -1.0, 1.0);
        var z: f32;
        if (p.z_source == 1u) {
            z = z_in[i];
        } else {
            z = gaussian(i % p.per_image, p.image_base + i / p.per_image, k, STREAM_STEP);
        }
        let mean = coef[row + 4u] * x0 + coef[row + 5u] * xv;
        x_upd[i] = mean + coef[row + 7u] * z;
    }
}

@compute @workgroup_size(1)
fn advance() {
    _ = p.numel; // every entry point binds the params at slot 0
    step_rw[0] = step_rw[0] + 1u;
}

// Fill a buffer with the Gaussian noise of (seed, image_base + i / per_image, step = p.batch,
// stream STEP): lets tests compare the GPU generator with its CPU reference.
@compute @workgroup_size(256)
fn gaussian_fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    noise_out[i] = gaussian(i % p.per_image, p.image_base + i / p.per_image, p.batch, STREAM_STEP);
}

// q_sample: reads coefficients [B, 2] and x0 (and noise when z_source = 1); writes x_t and the
// noise it used (the training target). p.batch holds the training step for the noise counter.
@group(0) @binding(1) var<storage, read> qcoef: array<f32>;
@group(0) @binding(2) var<storage, read> x0: array<f32>;
@group(0) @binding(3) var<storage, read> noise_given: array<f32>;
@group(0) @binding(4) var<storage, read_write> x_t: array<f32>;
@group(0) @binding(5) var<storage, read_write> noise_used: array<f32>;

@compute @workgroup_size(256)
fn q_sample(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    let img = i / p.per_image;
    var z: f32;
    if (p.z_source == 1u) {
        z = noise_given[i];
    } else {
        z = gaussian(i % p.per_image, p.image_base + img, p.batch, STREAM_TRAIN);
    }
    noise_used[i] = z;
    x_t[i] = qcoef[2u * img] * x0[i] + qcoef[2u * img + 1u] * z;
}
