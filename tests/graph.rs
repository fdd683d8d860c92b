//! The command graph: planning, compiling once, replaying, and failing cleanly.

mod common;

use bytemuck::Zeroable;
use common::*;
use sddpm_gpu::graph::{pack_spikes, plan_memory, unpack_spikes, DType, Graph, Node, Params, Plan, TensorId};
use sddpm_gpu::ops::{batchnorm, conv, elementwise, neuron, readout};

/// A small spiking block: conv -> BN (eval) -> IF -> conv -> + skip -> readout, over T = 4, B = 2.
struct Block {
    g: Graph,
    x: TensorId,
    params: Vec<(TensorId, Vec<f32>)>,
    out: TensorId,
}

const T: usize = 4;
const B: usize = 2;
const C: usize = 5;
const HW: usize = 8;

fn block(seed: u64) -> Block {
    let mut r = rng(seed);
    let mut g = Graph::new();
    let x = g.input("x", &[T * B, C, HW, HW]);
    let mut params = Vec::new();
    let mut param = |g: &mut Graph, name: &str, shape: &[usize], lo: f32, hi: f32| {
        let id = g.param(name, shape);
        params.push((id, uniform(&mut r, shape.iter().product(), lo, hi)));
        id
    };
    let w1 = param(&mut g, "conv1.weight", &[C, C, 3, 3], -0.4, 0.4);
    let b1 = param(&mut g, "conv1.bias", &[C], -0.1, 0.1);
    let bn = batchnorm::BnParams {
        weight: param(&mut g, "bn1.weight", &[C], 0.8, 1.2),
        bias: param(&mut g, "bn1.bias", &[C], 0.2, 0.5),
        running_mean: param(&mut g, "bn1.running_mean", &[C], -0.1, 0.1),
        running_var: param(&mut g, "bn1.running_var", &[C], 0.5, 1.5),
        groups: batchnorm::BnGroups::ONE,
    };
    let w2 = param(&mut g, "conv2.weight", &[C, C, 3, 3], -0.4, 0.4);
    let h = conv::conv2d(&mut g, x, w1, Some(b1), 1, 1, "conv1");
    let h = batchnorm::batchnorm_eval(&mut g, h, bn, "bn1");
    let s = neuron::neuron_forward(&mut g, h, T, neuron::Neuron::default(), "neuron1");
    let h = conv::conv2d(&mut g, s, w2, None, 1, 1, "conv2");
    let h = elementwise::add(&mut g, h, x, "residual");
    let out = readout::membrane_readout(&mut g, h, T, readout::DECAY, "readout");
    g.mark_output(out);
    Block { g, x, params, out }
}

fn block_cpu(b: &Block, xv: &[f32]) -> Vec<f32> {
    let p = |i: usize| &b.params[i].1[..];
    let h = conv::conv2d_cpu(xv, [T * B, C, HW, HW], p(0), [C, C, 3, 3], Some(p(1)), 1, 1);
    let h = batchnorm::batchnorm_eval_cpu(&h, C, HW * HW, p(2), p(3), p(4), p(5));
    let (s, _) = neuron::neuron_cpu(&h, T, neuron::Neuron::default());
    let h = conv::conv2d_cpu(&s, [T * B, C, HW, HW], p(6), [C, C, 3, 3], None, 1, 1);
    let h = elementwise::add_cpu(&h, xv);
    readout::membrane_readout_cpu(&h, T, readout::DECAY)
}

fn compiled(b: &Block) -> Plan {
    let plan = Plan::compile(ctx(), &b.g).unwrap();
    for (id, data) in &b.params {
        plan.write(ctx(), *id, data).unwrap();
    }
    plan
}

#[test]
fn chained_ops_equal_cpu_reference() {
    let b = block(1);
    let plan = compiled(&b);
    let xv = normalish(&mut rng(2), T * B * C * HW * HW, 1.0);
    plan.write(ctx(), b.x, &xv).unwrap();
    plan.run(ctx()).unwrap();
    let got = plan.read(ctx(), b.out).unwrap();
    let want = block_cpu(&b, &xv);
    assert!(want.iter().any(|v| v.abs() > 0.1), "the block must produce a non-trivial output");
    assert_close("spiking block", &got, &want, 1e-5, 1e-5);
}

#[test]
fn planner_reuses_intermediate_buffers() {
    let b = block(3);
    let m = plan_memory(&b.g);
    // conv1, bn1, conv2, residual are same-sized and at most 2 are live at once; the smaller
    // readout output fits into conv1's freed buffer. neuron1's packed spikes (32x smaller) live
    // from bn1 to conv2, touching both large slots' tenants, so they get a slot of their own.
    assert!(
        m.planned_intermediate_bytes < m.naive_intermediate_bytes,
        "planned {} vs naive {}",
        m.planned_intermediate_bytes,
        m.naive_intermediate_bytes
    );
    let act = (T * B * C * HW * HW * 4) as u64;
    assert_eq!(m.naive_intermediate_bytes, 4 * act + act / 32 + act / T as u64);
    assert_eq!(m.planned_intermediate_bytes, 2 * act + act / 32);
    // Shared slots really are distinct tensors: conv1's buffer is reused later.
    let slots: Vec<usize> = b.g.nodes.iter().map(|n| m.slot_of(n.writes[0])).collect();
    let distinct: std::collections::HashSet<_> = slots.iter().collect();
    assert!(distinct.len() < slots.len(), "some slot must be reused: {slots:?}");
}

#[test]
fn planner_never_aliases_a_nodes_reads_and_writes() {
    let b = block(4);
    let m = plan_memory(&b.g);
    for n in &b.g.nodes {
        for w in &n.writes {
            for r in &n.reads {
                assert_ne!(m.slot_of(*w), m.slot_of(*r), "node {} reads and writes one buffer", n.label);
            }
        }
    }
}

#[test]
fn replay_with_new_inputs_is_identical_per_input() {
    let b = block(5);
    let plan = compiled(&b);
    let c = ctx();
    let x1 = normalish(&mut rng(6), T * B * C * HW * HW, 1.0);
    let x2 = normalish(&mut rng(7), T * B * C * HW * HW, 1.0);
    plan.write(c, b.x, &x1).unwrap();
    plan.run(c).unwrap();
    let first = plan.read(c, b.out).unwrap();
    // New data, then the first data again: same plan, no new GPU objects.
    plan.write(c, b.x, &x2).unwrap();
    plan.run(c).unwrap();
    let other = plan.read(c, b.out).unwrap();
    plan.write(c, b.x, &x1).unwrap();
    plan.run(c).unwrap();
    let again = plan.read(c, b.out).unwrap();
    assert_eq!(bits(&first), bits(&again), "replay with the same input must be bitwise identical");
    assert_ne!(bits(&first), bits(&other), "a new input must change the output");
    assert_close("replayed block", &other, &block_cpu(&b, &x2), 1e-5, 1e-5);
}

#[test]
fn replay_creates_no_gpu_objects() {
    // Own context so concurrent tests cannot touch the counters.
    let c = sddpm_gpu::gpu::Context::new(None).unwrap();
    let b = block(8);
    let plan = Plan::compile(&c, &b.g).unwrap();
    for (id, data) in &b.params {
        plan.write(&c, *id, data).unwrap();
    }
    plan.write(&c, b.x, &normalish(&mut rng(9), T * B * C * HW * HW, 1.0)).unwrap();
    plan.run(&c).unwrap();
    plan.read(&c, b.out).unwrap();
    let before = c.counter_snapshot();
    assert!(before.pipelines > 0 && before.bind_groups == b.g.nodes.len());
    for _ in 0..3 {
        plan.run(&c).unwrap();
        plan.read(&c, b.out).unwrap();
    }
    assert_eq!(c.counter_snapshot(), before, "replay must not create buffers, bind groups or pipelines");
}

#[test]
fn long_graphs_split_into_bounded_submits() {
    // 2500 chained adds: more dispatches than one submit carries.
    let n = 1000;
    let mut g = Graph::new();
    let x = g.input("x", &[n]);
    let one = g.input("one", &[n]);
    let mut h = x;
    for i in 0..2500 {
        h = elementwise::add(&mut g, h, one, &format!("add{i}"));
    }
    g.mark_output(h);
    let m = plan_memory(&g);
    assert_eq!(m.planned_intermediate_bytes, 2 * 4 * n as u64, "a chain needs two ping-pong buffers");
    let c = ctx();
    let plan = Plan::compile(c, &g).unwrap();
    plan.write(c, x, &vec![0.5f32; n]).unwrap();
    plan.write(c, one, &vec![1f32; n]).unwrap();
    let stats = plan.run(c).unwrap();
    assert_eq!(stats.dispatches, 2500);
    assert!(stats.submits >= 2, "{stats:?}");
    assert_eq!(plan.read(c, h).unwrap(), vec![2500.5f32; n]);
}

#[test]
fn set_params_changes_a_replayed_node() {
    let mut g = Graph::new();
    let x = g.input("x", &[4, 3]);
    let s = neuron::neuron_forward(&mut g, x, 4, neuron::Neuron::default(), "n");
    g.mark_output(s);
    let c = ctx();
    let plan = Plan::compile(c, &g).unwrap();
    plan.write(c, x, &[0.998f32; 12]).unwrap();
    plan.run(c).unwrap();
    assert_eq!(plan.read(c, s).unwrap(), [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    let guided = neuron::Neuron { v_th: 0.997, ..Default::default() };
    let p = Params::of(&neuron::NeuronParams { n: 3, t: 4, v_th: guided.v_th, inv_tau: 1.0, ..Zeroable::zeroed() });
    plan.set_params(c, 0, &p);
    plan.run(c).unwrap();
    assert_eq!(plan.read(c, s).unwrap(), vec![1.0f32; 12]);
}

#[test]
fn invalid_binding_is_an_error_not_a_panic() {
    let mut g = Graph::new();
    let x = g.input("x", &[16]);
    let y = g.intermediate("y", &[16]);
    // The swish entry point takes one input; bind two.
    g.push(Node {
        shader: &elementwise::SHADER,
        entry: "swish",
        params: Params::of(&elementwise::ElementwiseParams { numel: 16, c: 0, s: 0, b: 0 }),
        reads: vec![x, x],
        writes: vec![y],
        workgroups: [1, 1, 1],
        label: "bad".into(),
        cost: Default::default(),
    });
    let err = Plan::compile(ctx(), &g).err().expect("a mis-bound node must fail to compile");
    let msg = format!("{err:#}");
    assert!(msg.contains("bad") && msg.contains("validation"), "{msg}");
    ctx().check().expect("the error must have been captured, not left for later");
}

#[test]
fn tensor_over_binding_limit_is_refused_clearly() {
    let c = ctx();
    let too_many = (c.max_binding_bytes() / 4 + 1) as usize;
    let mut g = Graph::new();
    let x = g.input("huge activation", &[too_many]);
    let y = elementwise::swish(&mut g, x, "swish");
    g.mark_output(y);
    let msg = format!("{:#}", Plan::compile(c, &g).err().expect("must refuse"));
    assert!(msg.contains("huge activation") && msg.contains("per storage binding"), "{msg}");
}

#[test]
fn wrong_upload_size_and_unreadable_intermediates_are_errors() {
    let b = block(10);
    let plan = compiled(&b);
    let msg = format!("{:#}", plan.write(ctx(), b.x, &[1f32; 3]).unwrap_err());
    assert!(msg.contains("'x'") && msg.contains("got 3"), "{msg}");
    let inner = b.g.nodes[0].writes[0];
    let msg = format!("{:#}", plan.read(ctx(), inner).unwrap_err());
    assert!(msg.contains("intermediate"), "{msg}");
}

#[test]
fn dtypes_size_storage_in_whole_blocks() {
    assert_eq!(DType::F32.bytes(3), 12);
    assert_eq!(DType::U32.bytes(1), 4);
    for (n, words) in [(1, 1), (31, 1), (32, 1), (33, 2), (64, 2), (65, 3), (1000, 32)] {
        assert_eq!(DType::Spike.bytes(n), 4 * words, "{n} spikes");
    }
    let mut g = Graph::new();
    let s = g.intermediate_as("s", &[3, 5, 7], DType::Spike);
    assert_eq!(g.info(s).bytes(), 4 * (105u64).div_ceil(32));
    let values: Vec<f32> = (0..105).map(|i| ((i * 7 + i / 3) % 3 == 0) as u32 as f32).collect();
    let words = pack_spikes(&values);
    assert_eq!(words.len(), 4);
    assert_eq!(unpack_spikes(&words, 105), values);
}

#[test]
fn dtype_mismatch_is_a_graph_error_naming_node_and_tensor() {
    let mut g = Graph::new();
    let x = g.input("x", &[40]);
    let s = g.intermediate_as("spikes of x", &[40], DType::Spike);
    g.push_typed(
        Node {
            shader: &neuron::SHADER,
            entry: "neuron_forward",
            params: Params::of(&neuron::NeuronParams { n: 40, t: 1, ..Zeroable::zeroed() }),
            reads: vec![x],
            writes: vec![s],
            workgroups: [1, 1, 1],
            label: "fires".into(),
            cost: Default::default(),
        },
        &[DType::F32],
        &[DType::Spike],
    );
    g.check().expect("declared dtypes match");
    // An op that does not declare dtypes reads F32: handing it packed spikes is refused.
    let y = elementwise::swish(&mut g, s, "swish of spikes");
    g.mark_output(y);
    let msg = format!("{:#}", g.check().unwrap_err());
    assert!(msg.contains("swish of spikes") && msg.contains("'spikes of x'") && msg.contains("spike"), "{msg}");
    let msg = format!("{:#}", Plan::compile(ctx(), &g).err().expect("compile refuses a mistyped graph"));
    assert!(msg.contains("swish of spikes"), "{msg}");
}

#[test]
fn sizes_past_u32_are_a_graph_error_not_a_panic() {
    let mut g = Graph::new();
    let x = g.input("images", &[20000 * 4, 128, 32, 32]);
    // Ops keep building (their parameters saturate); the error surfaces at check / compile.
    let y = elementwise::swish(&mut g, x, "swish");
    g.mark_output(y);
    let msg = format!("{:#}", g.check().unwrap_err());
    assert!(msg.contains("'images'") && msg.contains("10485760000 elements"), "{msg}");
    assert!(Plan::compile(ctx(), &g).is_err());
    // Fits u32 indices but not a dispatch: conv grids put the images on the z axis.
    let mut g = Graph::new();
    let x = g.input("x", &[70000, 1, 2, 2]);
    let w = g.param("w", &[1, 1, 3, 3]);
    conv::conv2d(&mut g, x, w, None, 1, 1, "wide conv");
    let msg = format!("{:#}", g.check().unwrap_err());
    assert!(msg.contains("wide conv") && msg.contains("70000 workgroups"), "{msg}");
}

/// A kernel with an off-by-one bounds check (`i > n` where `i >= n` is meant), and one that reads
/// its neighbour (`x[i + 1]`), for the guarded plans below.
static OFF_BY_ONE: sddpm_gpu::gpu::Shader = sddpm_gpu::gpu::Shader {
    name: "off_by_one (test)",
    source: "
struct Params { n: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64)
fn writes_one_past(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x > p.n) { return; }
    y[gid.x] = x[min(gid.x, p.n - 1u)] + 1.0;
}
@compute @workgroup_size(64)
fn reads_one_past(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= p.n) { return; }
    y[gid.x] = x[gid.x + 1u];
}
",
    trusted: true,
};

#[test]
fn guarded_plans_catch_out_of_bounds_kernels() {
    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct P {
        n: u32,
        pad: [u32; 3],
    }
    let n = 40;
    let graph = |entry: &'static str| {
        let mut g = Graph::new();
        let x = g.input("x", &[n]);
        let y = g.intermediate("y", &[n]);
        g.push(Node {
            shader: &OFF_BY_ONE,
            entry,
            params: Params::of(&P { n: n as u32, pad: [0; 3] }),
            reads: vec![x],
            writes: vec![y],
            workgroups: [1, 1, 1],
            label: entry.into(),
            cost: Default::default(),
        });
        g.mark_output(y);
        (g, x, y)
    };
    let c = ctx();
    for checks in [true, false] {
        // Checked modules (the op tests) and trusted ones (the release binary): the guard is part
        // of the binding, so neither wgpu nor the driver clamps the stray access away.
        let mut own = sddpm_gpu::gpu::Context::new(None).unwrap();
        own.shader_checks = checks;
        let c = if checks { c } else { &own };
        let (g, x, _) = graph("writes_one_past");
        let plan = Plan::compile_guarded(c, &g).unwrap();
        plan.write(c, x, &[0f32; 40]).unwrap();
        plan.run(c).unwrap();
        let err = plan.check_guards(c).unwrap_err().to_string();
        assert!(err.contains("past the end of tensor 'y'"), "{err}");

        let (g, x, y) = graph("reads_one_past");
        let plan = Plan::compile_guarded(c, &g).unwrap();
        plan.write(c, x, &[2f32; 40]).unwrap();
        plan.run(c).unwrap();
        plan.check_guards(c).unwrap();
        let got = plan.read(c, y).unwrap();
        assert!(got[..n - 1].iter().all(|&v| v == 2.0) && got[n - 1].is_nan(), "the stray read sees poison: {got:?}");
    }
}
