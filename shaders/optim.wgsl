// optim.wgsl: the optimizer step: clip + Adam and the EMA, over one tensor or over arenas.
//
// Global gradient-norm clipping and Adam (PyTorch's torch.optim.Adam, no weight decay):
//   total = sqrt(sumsq[0])                        (sum of squared gradients of every parameter)
//   clip  = min(max_norm / (total + 1e-6), 1)     (clip_grad_norm_: always applied)
//   g     = grad * clip
//   m     = beta1 m + (1 - beta1) g
//   v     = beta2 v + (1 - beta2) g^2
//   p     = p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps),   bc_i = 1 - beta_i^step
// Per-step values come from `hyper` = [lr, bc1, sqrt(bc2), max_norm] so the host updates one small
// tensor per step; betas and eps are per-node constants. Bandwidth-bound: 20 bytes read and 12
// written per parameter.
//
// Entries: `adam` and `ema_update` over one tensor (one invocation per element, p.n elements);
// `adam_arena` and `ema_arena` over arenas (src/graph/arena.rs): parameters, gradients and moments
// of many tensors at one shared layout, bound as vec4 arrays, with a chunk table chunks[k] =
// (start, len) in elements (start a multiple of 4, len at most 4096, never crossing a member's
// end, so padding between members is never touched): workgroup k updates chunk k, whole vec4s
// strided over its 256 invocations, the member's last partial vec4 element by element; p.n =
// chunks. Both forms run the same per-element float operations (adam_one, ema_one), so an
// element gets the same bits whichever updates it.

struct Params {
    n: u32, _pad0: u32, _pad1: u32, _pad2: u32,
    beta1: f32, beta2: f32, eps: f32, _pad3: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read> sumsq: array<f32>;
@group(0) @binding(3) var<storage, read> hyper: array<f32>;
@group(0) @binding(4) var<storage, read_write> param: array<f32>;
@group(0) @binding(5) var<storage, read_write> m: array<f32>;
@group(0) @binding(6) var<storage, read_write> v: array<f32>;

// The clip factor of this step (every element of every tensor uses the same one).
fn clip_factor() -> f32 {
    let max_norm = hyper[3];
    return min(max_norm / (sqrt(sumsq[0]) + 1e-6), 1.0);
}

// One element's step: (param, m, v) after gradient `gr`, clipped by `clip`.
fn adam_one(param_i: f32, gr: f32, m_i: f32, v_i: f32, clip: f32) -> vec3<f32> {
    let lr = hyper[0];
    let bc1 = hyper[1];
    let bc2_sqrt = hyper[2];
    let g = gr * clip;
    let mi = p.beta1 * m_i + (1.0 - p.beta1) * g;
    let vi = p.beta2 * v_i + (1.0 - p.beta2) * g * g;
    let denom = sqrt(vi) / bc2_sqrt + p.eps;
    return vec3<f32>(param_i - (lr / bc1) * mi / denom, mi, vi);
}

@compute @workgroup_size(256)
fn adam(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.n) {
        return;
    }
    let r = adam_one(param[i], grad[i], m[i], v[i], clip_factor());
    param[i] = r.x;
    m[i] = r.y;
    v[i] = r.z;
}

@group(0) @binding(1) var<storage, read> grad4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> chunks: array<vec2<u32>>;
@group(0) @binding(5) var<storage, read_write> param4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> m4: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> v4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn adam_arena(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let k = wid.y * nwg.x + wid.x;
    if (k >= p.n) {
        return;
    }
    let chunk = chunks[k];
    let clip = clip_factor();
    let start = chunk.x / 4u;
    let whole = chunk.y / 4u;
    for (var u = lid; u < whole; u += 256u) {
        let i = start + u;
        let pv = param4[i];
        let gv = grad4[i];
        let mv = m4[i];
        let vv = v4[i];
        let r0 = adam_one(pv.x, gv.x, mv.x, vv.x, clip);
        let r1 = adam_one(pv.y, gv.y, mv.y, vv.y, clip);
        let r2 = adam_one(pv.z, gv.z, mv.z, vv.z, clip);
        let r3 = adam_one(pv.w, gv.w, mv.w, vv.w, clip);
        param4[i] = vec4<f32>(r0.x, r1.x, r2.x, r3.x);
        m4[i] = vec4<f32>(r0.y, r1.y, r2.y, r3.y);
        v4[i] = vec4<f32>(r0.z, r1.z, r2.z, r3.z);
    }
    // The member's last elements, if it does not end on a whole vec4: element by element, so the
    // padding after it is never written.
    if (lid < chunk.y % 4u) {
        let i = start + whole;
        let r = adam_one(param4[i][lid], grad4[i][lid], m4[i][lid], v4[i][lid], clip);
        param4[i][lid] = r.x;
        m4[i][lid] = r.y;
        v4[i][lid] = r.z;
    }
}

// Exponential moving average of the weights (optional; the reference trains without it):
//   ema = decay * ema + (1 - decay) * param        (p.beta1 holds the decay)
@group(0) @binding(1) var<storage, read> param_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> ema: array<f32>;

fn ema_one(e: f32, w: f32) -> f32 {
    return p.beta1 * e + (1.0 - p.beta1) * w;
}

@compute @workgroup_size(256)
fn ema_update(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.n) {
        return;
    }
    ema[i] = ema_one(ema[i], param_in[i]);
}

@group(0) @binding(1) var<storage, read> param4_in: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> ema_chunks: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read_write> ema4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn ema_arena(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let k = wid.y * nwg.x + wid.x;
    if (k >= p.n) {
        return;
    }
    let chunk = ema_chunks[k];
    let start = chunk.x / 4u;
    let whole = chunk.y / 4u;
    for (var u = lid; u < whole; u += 256u) {
        let i = start + u;
        let e = ema4[i];
        let w = param4_in[i];
        ema4[i] = vec4<f32>(ema_one(e.x, w.x), ema_one(e.y, w.y), ema_one(e.z, w.z), ema_one(e.w, w.w));
    }
    if (lid < chunk.y % 4u) {
        let i = start + whole;
        ema4[i][lid] = ema_one(ema4[i][lid], param4_in[i][lid]);
    }
}
