// matmul.wgsl: C[M, N] = A[M, K] . B[K, N] (+ bias[N]), with A and B read through strides so one
// kernel serves x.W^T (nn.Linear), x.W and the transposed products backward passes need.
//
//   C[m, n] = bias[n] + sum_k A[m*a_sm + k*a_sk] * B[k*b_sk + n*b_sn]      (k ascending, bias last)
//
// Register blocking: each invocation computes a 4x4 tile of C (4 rows x 4 columns), so each
// loaded value of A feeds 4 FMAs and each loaded value of B feeds 4. A workgroup of WG_X x WG_Y
// invocations covers a (4*WG_Y) x (4*WG_X) block of C; WG_X and WG_Y are override constants set
// from Rust per variant (src/ops/matmul.rs VARIANTS; every variant sums in the same order, so
// all give bit-identical results). Napkin math: 2*M*N*K flops over (M*K + K*N + M*N)*4 bytes.
// Grid: x = ceil(N / (4*WG_X)), y = ceil(M / (4*WG_Y)).

struct Params {
    m: u32, n: u32, k: u32, has_bias: u32,
    a_sm: u32, a_sk: u32, b_sk: u32, b_sn: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

override WG_X: u32 = 8u;
override WG_Y: u32 = 8u;

@compute @workgroup_size(WG_X, WG_Y)
fn matmul(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n0 = gid.x * 4u;
    let m0 = gid.y * 4u;
    if (n0 >= p.n || m0 >= p.m) {
        return;
    }
    // Rows/columns past the edge read the last valid one and are never stored.
    var arow: vec4<u32>;
    var bcol: vec4<u32>;
    for (var q = 0u; q < 4u; q++) {
        arow[q] = min(m0 + q, p.m - 1u) * p.a_sm;
        bcol[q] = min(n0 + q, p.n - 1u) * p.b_sn;
    }
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k = 0u; k < p.k; k++) {
        let ka = k * p.a_sk;
        let kb = k * p.b_sk;
        let bv = vec4<f32>(b[kb + bcol[0]], b[kb + bcol[1]], b[kb + bcol[2]], b[kb + bcol[3]]);
        acc0 += a[arow[0] + ka] * bv;
        acc1 += a[arow[1] + ka] * bv;
        acc2 += a[arow[2] + ka] * bv;
        acc3 += a[arow[3] + ka] * bv;
    }
    var bv = vec4<f32>(0.0);
    if (p.has_bias != 0u) {
        for (var q = 0u; q < 4u; q++) {
            bv[q] = bias[min(n0 + q, p.n - 1u)];
        }
    }
    let accs = array<vec4<f32>, 4>(acc0 + bv, acc1 + bv, acc2 + bv, acc3 + bv);
    for (var r = 0u; r < 4u; r++) {
        if (m0 + r >= p.m) {
            break;
        }
        for (var q = 0u; q < 4u; q++) {
            if (n0 + q < p.n) {
                c[(m0 + r) * p.n + n0 + q] = accs[r][q];
            }
        }
    }
}
