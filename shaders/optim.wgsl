// optim.wgsl: the optimizer step, fused over one parameter tensor per dispatch.
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

@compute @workgroup_size(256)
fn adam(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.n) {
        return;
    }
    let lr = hyper[0];
    let bc1 = hyper[1];
    let bc2_sqrt = hyper[2];
    let max_norm = hyper[3];
    let clip = min(max_norm / (sqrt(sumsq[0]) + 1e-6), 1.0);
    let g = grad[i] * clip;
    let mi = p.beta1 * m[i] + (1.0 - p.beta1) * g;
    let vi = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    let denom = sqrt(vi) / bc2_sqrt + p.eps;
    param[i] = param[i] - (lr / bc1) * mi / denom;
}

// Exponential moving average of the weights (optional; the reference trains without it):
//   ema = decay * ema + (1 - decay) * param        (p.beta1 holds the decay)
@group(0) @binding(1) var<storage, read> param_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> ema: array<f32>;

@compute @workgroup_size(256)
fn ema_update(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.n) {
        return;
    }
    ema[i] = p.beta1 * ema[i] + (1.0 - p.beta1) * param_in[i];
}
